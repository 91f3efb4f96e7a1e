"""One router per resource: chat, completions, embeddings, models, kernel, health."""
