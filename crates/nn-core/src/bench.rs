//! Timing harness (placeholder).
