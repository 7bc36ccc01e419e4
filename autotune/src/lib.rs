//! Autotuning of kernel variants per device (issue 5): not built yet.
