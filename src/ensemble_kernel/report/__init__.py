"""The only code that draws: figures and the files they are written to."""
