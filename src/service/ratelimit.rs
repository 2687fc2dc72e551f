//! Token-bucket rate limits per user and per IP address, kept in memory.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use parking_lot::Mutex;

use crate::{
    config::{RateLimit, RateLimits},
    error::{Error, Result},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Login,
    Registration,
    Message,
    /// A notary key query (`/_matrix/key/v2/query`), per IP address.
    KeyQuery,
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

pub struct RateLimiter {
    config: RateLimits,
    buckets: Mutex<HashMap<(Action, String), Bucket>>,
}

/// Forget idle buckets beyond this many, so a flood of distinct IPs cannot grow memory forever.
const MAX_BUCKETS: usize = 100_000;

impl RateLimiter {
    pub fn new(config: RateLimits) -> RateLimiter {
        RateLimiter {
            config,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn limit(&self, action: Action) -> RateLimit {
        match action {
            Action::Login => self.config.login,
            Action::Registration => self.config.registration,
            Action::Message => self.config.message,
            Action::KeyQuery => self.config.key_query,
        }
    }

    /// Take one token for `key` (a user id or an IP address), or fail with `M_LIMIT_EXCEEDED`.
    pub fn check(&self, action: Action, key: &str) -> Result<()> {
        if !self.config.enabled {
            return Ok(());
        }
        let limit = self.limit(action);
        let now = Instant::now();
        let mut buckets = self.buckets.lock();
        if buckets.len() > MAX_BUCKETS {
            let full = Duration::from_secs_f64(f64::from(limit.burst) / limit.per_second);
            buckets.retain(|_, b| now.duration_since(b.updated) < full);
        }
        let bucket = buckets.entry((action, key.to_owned())).or_insert(Bucket {
            tokens: f64::from(limit.burst),
            updated: now,
        });
        let elapsed = now.duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * limit.per_second).min(f64::from(limit.burst));
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) / limit.per_second;
            Err(Error::RateLimited {
                retry_after_ms: (wait * 1000.0).ceil() as u64,
            })
        }
    }
}
