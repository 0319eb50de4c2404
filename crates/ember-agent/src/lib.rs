//! The host agent: sandbox lifecycle, pause/resume, templates, cleanup and recovery on one machine.
