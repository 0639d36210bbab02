//! Log pages (stub).
