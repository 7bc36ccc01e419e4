//! Paged caches, scheduler, sampling (issue 7): not built yet.
