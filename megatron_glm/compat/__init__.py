"""Seams to third-party libraries: each module gathers what we rely on beyond a library's
public API, with the reason and the upstream change that would make it unnecessary."""
