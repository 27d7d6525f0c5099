"""Planning: will a run fit the card, from the memory a step needs."""
