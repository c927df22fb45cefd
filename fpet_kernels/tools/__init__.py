"""Developer and measurement tools: not imported by `import fpet_kernels`."""
