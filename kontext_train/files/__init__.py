"""Files written so that a crash never leaves half a file, and the folders a run may write to."""
