//! A compiled policy that can be replaced while requests use it
//! (`/admin/reload`, SIGHUP). Readers take a snapshot and keep it for the
//! whole request or stream, so one exchange never sees two policies.

use std::sync::{Arc, RwLock};

pub struct Shared<T>(RwLock<Arc<T>>);

impl<T> Shared<T> {
    pub fn new(value: T) -> Arc<Self> {
        Arc::new(Self(RwLock::new(Arc::new(value))))
    }

    /// The current value.
    pub fn get(&self) -> Arc<T> {
        match self.0.read() {
            Ok(v) => v.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replace it; requests in flight finish on the old one.
    pub fn set(&self, value: T) {
        match self.0.write() {
            Ok(mut v) => *v = Arc::new(value),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(value),
        }
    }
}
