//! Throttling of the endpoints that guess secrets: sign-in attempts per
//! account and token requests per client (GCRA buckets from `governor`).
//! A caller over its rate gets 429 with `Retry-After`; the bucket of one
//! account or client does not slow any other.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Keys kept before buckets that are full again are dropped (an attacker
/// trying random usernames must not grow memory without bound).
const MAX_KEYS: usize = 10_000;

pub struct Throttle {
    logins: DefaultKeyedRateLimiter<String>,
    tokens: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
}

fn quota(per_minute: u32) -> Quota {
    Quota::per_minute(NonZeroU32::new(per_minute.max(1)).unwrap_or(NonZeroU32::MIN))
}

impl Throttle {
    /// `logins_per_minute` sign-in attempts per account, and
    /// `tokens_per_minute` token requests per client, each with a burst of
    /// the same size.
    pub fn new(logins_per_minute: u32, tokens_per_minute: u32) -> Throttle {
        Throttle {
            logins: RateLimiter::keyed(quota(logins_per_minute)),
            tokens: RateLimiter::keyed(quota(tokens_per_minute)),
            clock: DefaultClock::default(),
        }
    }

    /// A sign-in attempt for `username`: `Err(wait)` when over the rate.
    pub fn login(&self, username: &str) -> Result<(), Duration> {
        self.check(&self.logins, username.to_lowercase())
    }

    /// A token request by `client_id`: `Err(wait)` when over the rate.
    pub fn token(&self, client_id: &str) -> Result<(), Duration> {
        self.check(&self.tokens, client_id.to_string())
    }

    fn check(
        &self,
        limiter: &DefaultKeyedRateLimiter<String>,
        key: String,
    ) -> Result<(), Duration> {
        if limiter.len() > MAX_KEYS {
            limiter.retain_recent();
        }
        limiter
            .check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_has_its_own_bucket() {
        let t = Throttle::new(3, 2);
        for _ in 0..3 {
            assert!(t.login("ann").is_ok());
        }
        let wait = t.login("ANN").unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(20));
        assert!(t.login("bob").is_ok());
        assert!(t.token("app").is_ok() && t.token("app").is_ok());
        assert!(t.token("app").is_err());
        assert!(t.token("other").is_ok());
    }
}
