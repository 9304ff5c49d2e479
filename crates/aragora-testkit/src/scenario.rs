//! A scenario whose steps must run in order on one server (each changes what
//! the next sees: restarts, revocations, rotations) but whose tests should
//! still name one behaviour each. The scenario runs once, each step under
//! `catch_unwind`, its outcome recorded by name; one `#[test]` per step then
//! reports that step's outcome (`scenario_tests!`). A failed step does not
//! stop the later ones, so one broken behaviour fails one test, plus the
//! steps that depend on it, each naming itself.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// The recorded outcome of every step that ran.
#[derive(Debug, Default)]
pub struct Scenario {
    outcomes: BTreeMap<&'static str, Result<(), String>>,
    order: Vec<&'static str>,
}

fn message(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}

impl Scenario {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `f` as the step `name`; its value, or `None` when it panicked
    /// (the panic is recorded for the step's test).
    pub fn step<T>(&mut self, name: &'static str, f: impl FnOnce() -> T) -> Option<T> {
        assert!(
            !self.outcomes.contains_key(name),
            "scenario step {name} named twice"
        );
        self.order.push(name);
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(v) => {
                self.outcomes.insert(name, Ok(()));
                Some(v)
            }
            Err(e) => {
                self.outcomes.insert(name, Err(message(&*e)));
                None
            }
        }
    }

    /// Panics with the step's failure; also when it never ran (an earlier
    /// step it needs failed, or it was never written).
    pub fn assert_step(&self, name: &str) {
        match self.outcomes.get(name) {
            Some(Ok(())) => {}
            Some(Err(e)) => panic!("{e}"),
            None => {
                let failed: Vec<_> = self
                    .order
                    .iter()
                    .filter(|n| matches!(self.outcomes.get(*n), Some(Err(_))))
                    .collect();
                panic!("step {name} did not run (failed steps: {failed:?})")
            }
        }
    }

    /// The steps that ran, in order.
    pub fn steps(&self) -> &[&'static str] {
        &self.order
    }
}

/// One `#[test]` per named step of the scenario `$scenario()` returns (a
/// `&'static Scenario`, typically from a `OnceLock`), in module `$module`, plus
/// one checking that every step that ran has its test:
/// `scenario_tests!(mod credentials = credentials_scenario; step_a, step_b);`
#[macro_export]
macro_rules! scenario_tests {
    (mod $module:ident = $scenario:ident; $($step:ident),* $(,)?) => {
        mod $module {
            $(
                #[test]
                fn $step() {
                    super::$scenario().assert_step(stringify!($step));
                }
            )*

            #[test]
            fn every_step_has_a_test() {
                let tested = [$(stringify!($step)),*];
                let untested: Vec<_> = super::$scenario()
                    .steps()
                    .iter()
                    .filter(|s| !tested.contains(s))
                    .collect();
                assert!(untested.is_empty(), "steps without a test: {untested:?}");
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::Scenario;

    #[test]
    fn a_failed_step_is_recorded_and_later_steps_still_run() {
        let mut sc = Scenario::new();
        assert_eq!(sc.step("first", || 1), Some(1));
        assert_eq!(sc.step("second", || -> u8 { panic!("second broke") }), None);
        assert_eq!(sc.step("third", || 3), Some(3));
        assert_eq!(sc.steps(), ["first", "second", "third"]);
        sc.assert_step("first");
        sc.assert_step("third");
        let e = std::panic::catch_unwind(|| sc.assert_step("second")).expect_err("second failed");
        assert_eq!(
            e.downcast_ref::<String>().map(String::as_str),
            Some("second broke")
        );
    }

    #[test]
    fn a_step_that_never_ran_fails_naming_the_failed_ones() {
        let mut sc = Scenario::new();
        sc.step("setup", || -> () { panic!("no server") });
        let e = std::panic::catch_unwind(|| sc.assert_step("later")).expect_err("never ran");
        let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("later") && msg.contains("setup"), "{msg}");
    }
}
