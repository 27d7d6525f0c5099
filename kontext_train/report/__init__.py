"""Measuring and showing: restoration metrics, LPIPS offline, loss plots and image grids."""
