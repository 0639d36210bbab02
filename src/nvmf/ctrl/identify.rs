//! Identify (stub).
