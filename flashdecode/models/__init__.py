"""Model loading (GGUF, Hugging Face safetensors), architecture specs, tokenizer, and the decoder."""
