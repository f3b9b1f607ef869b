"""`python -m demos.voice_assistant`."""

from .cli import main

main(prog_name="python -m demos.voice_assistant")
