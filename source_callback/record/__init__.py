"""Framework-free recording: the checkpoint plan and the recorder."""
