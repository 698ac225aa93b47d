"""Embedded assets (the default avatar). A package so that setuptools ships its files as package data."""
