//! A circuit breaker for a guard: after `failures` errors within
//! `window_ms` it opens and calls are refused at once (the filter's
//! `on_error` decides what that means) for `open_ms`; then one probe is
//! let through (half-open): success closes it, failure opens it again.
//! Time is injected, so tests move it instead of sleeping.

use crate::clock::Clock;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerSettings {
    /// Errors within the window that open the breaker.
    pub failures: usize,
    pub window_ms: u64,
    /// How long it stays open before a probe.
    pub open_ms: u64,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failures: 5,
            window_ms: 10_000,
            open_ms: 5_000,
        }
    }
}

/// The breaker's state, for `/metrics` and the audit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

struct Inner {
    state: State,
    /// Times of recent errors (closed state).
    errors: VecDeque<u64>,
    opened_at: u64,
    /// A half-open probe is in flight, since `probe_at`.
    probing: bool,
    probe_at: u64,
}

pub struct Breaker {
    settings: BreakerSettings,
    clock: Arc<dyn Clock>,
    inner: Mutex<Inner>,
}

/// Whether a call may go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    Go,
    /// The half-open probe: report its outcome.
    Probe,
    Refused,
}

impl Breaker {
    pub fn new(settings: BreakerSettings, clock: Arc<dyn Clock>) -> Self {
        Self {
            settings,
            clock,
            inner: Mutex::new(Inner {
                state: State::Closed,
                errors: VecDeque::new(),
                opened_at: 0,
                probing: false,
                probe_at: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    pub fn state(&self) -> State {
        let now = self.clock.now_ms();
        let mut i = self.lock();
        self.advance(&mut i, now);
        i.state
    }

    /// Open long enough: half-open. A probe that never reported (its
    /// call was dropped) is given up after the same time.
    fn advance(&self, i: &mut Inner, now: u64) {
        if i.state == State::Open && now.saturating_sub(i.opened_at) >= self.settings.open_ms {
            i.state = State::HalfOpen;
            i.probing = false;
        }
        if i.state == State::HalfOpen
            && i.probing
            && now.saturating_sub(i.probe_at) >= self.settings.open_ms
        {
            i.probing = false;
        }
    }

    /// A call that was not made (over the concurrency cap): a probe's
    /// place is given back.
    pub fn release(&self) {
        self.lock().probing = false;
    }

    /// Ask before calling the guard.
    pub fn permit(&self) -> Permit {
        let now = self.clock.now_ms();
        let mut i = self.lock();
        self.advance(&mut i, now);
        match i.state {
            State::Closed => Permit::Go,
            State::Open => Permit::Refused,
            State::HalfOpen if i.probing => Permit::Refused,
            State::HalfOpen => {
                i.probing = true;
                i.probe_at = now;
                Permit::Probe
            }
        }
    }

    /// The call succeeded.
    pub fn success(&self) {
        let mut i = self.lock();
        if i.state == State::HalfOpen {
            i.state = State::Closed;
            i.errors.clear();
        }
        i.probing = false;
    }

    /// The call failed (timeout, connection, unreadable answer).
    pub fn failure(&self) {
        let now = self.clock.now_ms();
        let mut i = self.lock();
        match i.state {
            State::HalfOpen => {
                i.state = State::Open;
                i.opened_at = now;
                i.probing = false;
            }
            State::Closed => {
                i.errors.push_back(now);
                let since = now.saturating_sub(self.settings.window_ms);
                while i.errors.front().is_some_and(|&t| t < since) {
                    i.errors.pop_front();
                }
                if i.errors.len() >= self.settings.failures.max(1) {
                    i.state = State::Open;
                    i.opened_at = now;
                    i.errors.clear();
                }
            }
            State::Open => {}
        }
    }
}
