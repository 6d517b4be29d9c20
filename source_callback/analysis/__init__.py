"""The analysis half: segments, curvature, matrix functions, scoring (SOURCE-math.md)."""
