"""The OpenAI fine-tuning API's logic: files (/v1/files) and jobs (/v1/fine_tuning/jobs) over the task service."""
