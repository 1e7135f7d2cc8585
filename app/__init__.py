"""The explorer: a Gradio app that browses a bundle's neurons and steers a LLaVA caption live (`python -m app`)."""
