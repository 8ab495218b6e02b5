//! Burrow edge worker.
