//! Token-bucket rate limits per user and per client address, kept in memory.
//!
//! Client addresses are the real client's (`RequestCtx`, behind `trusted_proxies`) and are
//! keyed by network where one holder has many: an IPv6 client gets a whole /64, so its
//! addresses share one bucket ([`ip_key`]).

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use parking_lot::Mutex;

use crate::{
    config::{RateLimit, RateLimits},
    error::{Error, Result},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Password checks (login, re-authentication), per client address.
    Login,
    /// Failed password checks of one account from one client address (see
    /// [`password_failure_key`]).
    LoginFailure,
    Registration,
    Message,
    /// A notary key query (`/_matrix/key/v2/query`), per IP address.
    KeyQuery,
}

/// The key of a client address: an IPv4 address as it is, an IPv6 address by its /64 (one
/// subscriber's network: rotating through it must not give fresh buckets). IPv4-mapped IPv6
/// addresses count as the IPv4 address.
pub fn ip_key(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

/// The key of failed password checks: the account *and* the client address. Keyed by the
/// account alone, someone guessing elsewhere would lock its owner out for as long as they keep
/// guessing; with the address, the owner's own attempts have their own bucket, and the
/// guesser's bucket refills (decays) on its own.
pub fn password_failure_key(user: &str, ip: Option<IpAddr>) -> String {
    match ip {
        Some(ip) => format!("{user}\n{}", ip_key(ip)),
        None => format!("{user}\n-"),
    }
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
            Action::LoginFailure => self.config.login_failures,
            Action::Registration => self.config.registration,
            Action::Message => self.config.message,
            Action::KeyQuery => self.config.key_query,
        }
    }

    /// Take one token for the client address `ip` (keyed by [`ip_key`]).
    pub fn check_ip(&self, action: Action, ip: IpAddr) -> Result<()> {
        self.check(action, &ip_key(ip))
    }

    /// Give back a token taken for `key` (what was counted turned out not to count: a password
    /// check that succeeded).
    pub fn refund(&self, action: Action, key: &str) {
        if !self.config.enabled {
            return;
        }
        let burst = f64::from(self.limit(action).burst);
        if let Some(b) = self.buckets.lock().get_mut(&(action, key.to_owned())) {
            b.tokens = (b.tokens + 1.0).min(burst);
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
            // Only buckets that have refilled completely (each by its own action's rate) are
            // forgotten: one that is forgotten earlier would hand an attacker a fresh burst.
            buckets.retain(|(a, _), b| {
                let l = self.limit(*a);
                let full = Duration::from_secs_f64(f64::from(l.burst) / l.per_second);
                now.duration_since(b.updated) < full
            });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_is_keyed_by_its_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(ip_key(a), ip_key(b));
        assert_ne!(ip_key(a), ip_key(c));
        assert_eq!(ip_key(a), "2001:db8:1:2::/64");
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(ip_key(mapped), "192.0.2.7");
    }

    #[test]
    fn refunded_tokens_do_not_count() {
        let rl = RateLimiter::new(RateLimits {
            login_failures: RateLimit {
                per_second: 0.001,
                burst: 2,
            },
            ..RateLimits::default()
        });
        let key = password_failure_key("@a:x", "192.0.2.1".parse().ok());
        for _ in 0..10 {
            rl.check(Action::LoginFailure, &key).unwrap();
            rl.refund(Action::LoginFailure, &key);
        }
        rl.check(Action::LoginFailure, &key).unwrap();
        rl.check(Action::LoginFailure, &key).unwrap();
        assert!(rl.check(Action::LoginFailure, &key).is_err());
        // Another address is not affected.
        let other = password_failure_key("@a:x", "198.51.100.1".parse().ok());
        rl.check(Action::LoginFailure, &other).unwrap();
    }
}
