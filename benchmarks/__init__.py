"""Side-by-side training benchmark of peftchat against hand-written transformers+peft+bitsandbytes."""
