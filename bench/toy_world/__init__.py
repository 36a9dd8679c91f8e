"""A synthetic text-to-image world small enough for two CPU cores, used to test the paper's claim end to
end with the project's own inversion loop and guidance math (`python -m bench.paper_in_miniature`)."""
