"""Engines: the external tools the format plugins drive (GPTQModel, llama.cpp), wrapped once each."""
