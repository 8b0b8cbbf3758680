"""The model code: sampling, reward scores, CPU inference and the trainers (SFT, reward model, PPO, DPO, RLOO).

Pure torch and transformers: every function takes plain values (token ids, chats as lists of dicts, paths,
configs) and returns plain values. Nothing here imports Django, the settings or the apps; the workers
(models_service.sampling, models_service.scoring, training_jobs.runner, training_jobs.evaluate) adapt database
rows to it. The web process never imports it. Both rules are import-linter contracts (pyproject.toml).
"""
