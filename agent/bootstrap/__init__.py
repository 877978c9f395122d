"""The bootstrap pipeline: detect -> pull models -> prepare -> start services -> wait ready -> register -> ready."""
