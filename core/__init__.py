"""Darkroom's pipeline core: models, samplers, queue and worker. Never imports Textual or Rich."""
