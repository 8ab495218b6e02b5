//! Burrow control plane.
