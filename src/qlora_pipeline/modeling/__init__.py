"""Loading the base model, quantizing it with bitsandbytes, and wrapping it with PEFT."""
