//! Retention (D4): how long a room's messages are kept. A room's `m.room.retention` state event
//! (MSC1763: `max_lifetime`, `min_lifetime`, in milliseconds) asks for a lifetime; the server's
//! config gives the default for rooms without one and the bounds a room may ask for. This module
//! only decides; the purge itself is `service::retention`.

use serde_json::Value;

use crate::config::{Config, RetentionConfig};

/// The retention rules of the server.
#[derive(Clone, Debug, Default)]
pub struct RetentionPolicy {
    default_max_lifetime: Option<u64>,
    allowed_min: Option<u64>,
    allowed_max: Option<u64>,
}

impl RetentionPolicy {
    pub fn new(config: &Config) -> RetentionPolicy {
        Self::from_config(&config.retention)
    }

    pub fn from_config(c: &RetentionConfig) -> RetentionPolicy {
        RetentionPolicy {
            default_max_lifetime: c.default_max_lifetime,
            allowed_min: c.allowed_min,
            allowed_max: c.allowed_max,
        }
    }

    /// How long (ms) messages of a room whose `m.room.retention` content is `room` (None: no
    /// such state event) are kept; None: forever.
    ///
    /// - The room's `max_lifetime` is taken when it is a non-negative integer, else the server's
    ///   `default_max_lifetime`.
    /// - A `min_lifetime` larger than the maximum raises it (messages are kept at least that
    ///   long: the room asked for both, the longer one protects what it promised).
    /// - The result is clamped into `[allowed_min, allowed_max]`; `allowed_max` also applies to
    ///   rooms that ask for nothing, so an operator can set a server-wide upper bound alone.
    pub fn effective_max_lifetime(&self, room: Option<&Value>) -> Option<u64> {
        let field = |name: &str| room.and_then(|c| c.get(name)).and_then(Value::as_u64);
        let mut lifetime = field("max_lifetime").or(self.default_max_lifetime);
        if let (Some(max), Some(min)) = (lifetime, field("min_lifetime")) {
            lifetime = Some(max.max(min));
        }
        let lifetime = match (lifetime, self.allowed_max) {
            (None, bound) => bound,
            (Some(l), Some(bound)) => Some(l.min(bound)),
            (Some(l), None) => Some(l),
        }?;
        Some(match self.allowed_min {
            Some(min) => lifetime.max(min),
            None => lifetime,
        })
    }

    /// Does any room's history expire on this server without a room asking for it?
    pub fn has_server_lifetime(&self) -> bool {
        self.default_max_lifetime.is_some() || self.allowed_max.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(default: Option<u64>, min: Option<u64>, max: Option<u64>) -> RetentionPolicy {
        RetentionPolicy {
            default_max_lifetime: default,
            allowed_min: min,
            allowed_max: max,
        }
    }

    #[test]
    fn effective_lifetime() {
        let room = json!({ "max_lifetime": 5000 });
        assert_eq!(policy(None, None, None).effective_max_lifetime(None), None);
        assert_eq!(
            policy(None, None, None).effective_max_lifetime(Some(&room)),
            Some(5000)
        );
        assert_eq!(
            policy(Some(9), None, None).effective_max_lifetime(None),
            Some(9)
        );
        // Bounds clamp what the room asks for, and the maximum applies to every room.
        assert_eq!(
            policy(None, Some(10_000), None).effective_max_lifetime(Some(&room)),
            Some(10_000)
        );
        assert_eq!(
            policy(None, None, Some(1000)).effective_max_lifetime(Some(&room)),
            Some(1000)
        );
        assert_eq!(
            policy(None, None, Some(1000)).effective_max_lifetime(None),
            Some(1000)
        );
        // min_lifetime above max_lifetime keeps messages longer; junk values are ignored.
        let both = json!({ "max_lifetime": 1000, "min_lifetime": 3000 });
        assert_eq!(
            policy(None, None, None).effective_max_lifetime(Some(&both)),
            Some(3000)
        );
        let junk = json!({ "max_lifetime": "soon" });
        assert_eq!(
            policy(Some(7), None, None).effective_max_lifetime(Some(&junk)),
            Some(7)
        );
    }
}
