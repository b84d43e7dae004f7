//! Health checks, in one place for the two sides that run them.
//!
//! An agent runs the HTTP, TCP and exec checks of the instances it registered, on its
//! own host, and reports only verdict changes; the elected registry server runs the
//! checks of instances registered through the API without an agent. Both must judge
//! the same way, so the rise/fall [`Hysteresis`] and the network [`probe`] live here and
//! nowhere else.
#![warn(missing_docs)]

mod hysteresis;
mod probe;

pub use hysteresis::Hysteresis;
pub use probe::{probe, probe_client};

use flotilla_core::HealthStatus;

/// An instance's verdict from its checks' current states and last outputs: passing when
/// every check passes; the output is the first failing check's (what `ps` shows), else
/// the first check's.
pub fn verdict<'a>(
    checks: impl IntoIterator<Item = (HealthStatus, &'a str)>,
) -> (HealthStatus, String) {
    let mut first = None;
    for (status, output) in checks {
        if status == HealthStatus::Critical {
            return (HealthStatus::Critical, output.to_owned());
        }
        first.get_or_insert(output);
    }
    (HealthStatus::Passing, first.unwrap_or_default().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_failing_check_fails_the_instance_and_names_itself() {
        use HealthStatus::*;
        assert_eq!(
            verdict([(Passing, "HTTP 200"), (Passing, "ok")]),
            (Passing, "HTTP 200".into())
        );
        assert_eq!(
            verdict([(Passing, "HTTP 200"), (Critical, "TCP connect: refused")]),
            (Critical, "TCP connect: refused".into())
        );
        assert_eq!(verdict([]), (Passing, String::new()));
    }
}
