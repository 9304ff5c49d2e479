//! The child-process protocol shared by the SIGKILL crash tests (`crash.rs`,
//! `crash_at_rest.rs`, `backup_crash.rs`).
//!
//! A crash test re-executes its own test binary as a child that runs one
//! `#[ignore]`d entry point (so `cargo test` lists it as ignored and never counts it
//! as a passing test); the entry point does nothing unless its environment variable
//! is set. The child reports progress as `@aedb@ `-prefixed lines on stdout
//! (`opening`, `ready`, each acknowledged commit, ...). The parent never kills on a
//! timer started at spawn: it waits for the reports it wants (the child has opened,
//! then N acknowledged commits), then adds a small random delay and sends SIGKILL, so
//! what a kill interrupts does not depend on how fast the machine is.
//!
//! A child that dies any other way fails the test: its panics go to stderr and abort
//! the process (a panic in a background thread included), and the parent checks that
//! the exit status is its own SIGKILL and that stderr reports no panic. A child whose
//! parent died exits when its stdin (a pipe from the parent) closes.

#![allow(dead_code)]

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Starts every report line: libtest writes to the same stdout, and its
/// "test name ... " has no newline before the first report.
pub const MARK: &str = "@aedb@ ";
/// Printed on stderr by a panicking child.
pub const PANIC_MARK: &str = "@aedb@ child panicked";
const SIGKILL: i32 = 9;
/// Only a hung child (or a deadlocked engine) gets anywhere near this: it bounds
/// the wait for one report, it is not a kill schedule.
pub const HANG_TIMEOUT: Duration = Duration::from_secs(600);

/// Child side: one report line, flushed at once.
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // The parent may be gone (then stdin closes and we exit); nothing to do here.
    let _ = writeln!(out, "{MARK}{line}");
    let _ = out.flush();
}

/// Child side: the value of `var` if this process is a crash-test child; `None`
/// (after saying so on stderr) when the entry point was run on its own.
pub fn child_env(var: &str, parent_test: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) => {
            install_child_guards();
            Some(v)
        }
        Err(_) => {
            eprintln!(
                "skipped: this is the SIGKILL child of `{parent_test}` and runs only when that test re-executes it ({var} unset)"
            );
            None
        }
    }
}

/// Any panic, in any thread, aborts the child after reporting on stderr (a
/// panicking background thread would otherwise die silently); and the child exits
/// when the parent's end of its stdin closes.
fn install_child_guards() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        eprintln!(
            "{PANIC_MARK} in thread {:?}: {info}\n{}",
            thread.name(),
            std::backtrace::Backtrace::force_capture()
        );
        std::process::abort();
    }));
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        // The parent is gone: it can no longer kill us.
        std::process::exit(0);
    });
}

/// Parent side: a running child and what it reported so far.
pub struct Running {
    child: Child,
    /// Held open until the kill: the child exits when it closes.
    stdin: Option<ChildStdin>,
    rx: mpsc::Receiver<String>,
    out_reader: Option<JoinHandle<()>>,
    err_reader: Option<JoinHandle<String>>,
    pub lines: Vec<String>,
}

/// Parent side: a finished child.
pub struct Finished {
    pub lines: Vec<String>,
    pub stderr: String,
    pub status: ExitStatus,
}

impl Finished {
    /// The child was killed by our SIGKILL, and nothing else went wrong in it.
    pub fn assert_killed(&self, ctx: &str) {
        assert!(
            self.status.signal() == Some(SIGKILL) && !self.stderr.contains(PANIC_MARK),
            "{ctx}: the child did not die by the test's SIGKILL ({}){}\nstdout reports:\n{}\nstderr:\n{}",
            self.status,
            if self.stderr.contains(PANIC_MARK) {
                ", it panicked"
            } else {
                ""
            },
            self.lines.join("\n"),
            self.stderr
        );
    }

    pub fn count(&self, prefix: &str) -> usize {
        self.lines.iter().filter(|l| l.starts_with(prefix)).count()
    }
}

/// Re-executes this test binary as the child running `entry` (an ignored test),
/// with `envs` set.
pub fn spawn(entry: &str, envs: &[(&str, OsString)]) -> Running {
    let mut cmd = Command::new(std::env::current_exe().expect("current_exe"));
    cmd.args([
        "--ignored",
        "--exact",
        entry,
        "--nocapture",
        "--test-threads=1",
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn crash-test child");
    let stdin = child.stdin.take();
    let stdout = child.stdout.take().expect("child stdout");
    let mut stderr = child.stderr.take().expect("child stderr");
    let (tx, rx) = mpsc::channel::<String>();
    let out_reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                // A line cut short by the kill is not a report.
                Ok(_) if !line.ends_with('\n') => break,
                Ok(_) => {
                    let Some((_, report)) = line.trim_end().split_once(MARK) else {
                        continue;
                    };
                    if tx.send(report.to_string()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    Running {
        child,
        stdin,
        rx,
        out_reader: Some(out_reader),
        err_reader: Some(err_reader),
        lines: Vec::new(),
    }
}

impl Running {
    /// Reads reports until `done` says enough (true), or the child's stdout ends
    /// (false: it exited, which the caller reports with `finish`). A child silent
    /// for `HANG_TIMEOUT` is a hang and fails the test.
    pub fn wait_until(&mut self, mut done: impl FnMut(&[String]) -> bool) -> bool {
        if done(&self.lines) {
            return true;
        }
        loop {
            match self.rx.recv_timeout(HANG_TIMEOUT) {
                Ok(line) => {
                    self.lines.push(line);
                    if done(&self.lines) {
                        return true;
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return false,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!(
                        "crash-test child silent for {HANG_TIMEOUT:?} (hung?); reports so far:\n{}",
                        self.lines.join("\n")
                    );
                }
            }
        }
    }

    /// Waits for `n` reports starting with `prefix` (counting those already read).
    pub fn wait_for(&mut self, prefix: &str, n: usize) -> bool {
        self.wait_until(|lines| lines.iter().filter(|l| l.starts_with(prefix)).count() >= n)
    }

    /// SIGKILLs the child after `delay`, reaps it and collects everything it said.
    pub fn kill_after(mut self, delay: Duration) -> Finished {
        if !delay.is_zero() {
            let until = Instant::now() + delay;
            // Short sleeps: precise enough for sub-millisecond delays.
            while Instant::now() < until {
                std::thread::sleep(Duration::from_micros(100).min(until - Instant::now()));
            }
        }
        // `Child::kill` is SIGKILL on Unix; it fails only if the child was reaped.
        let _ = self.child.kill();
        self.finish()
    }

    /// Reaps the child (whatever ended it) and collects everything it said.
    pub fn finish(mut self) -> Finished {
        let status = self.child.wait().expect("wait for child");
        drop(self.stdin.take());
        if let Some(h) = self.out_reader.take() {
            h.join().expect("stdout reader");
        }
        self.lines.extend(self.rx.try_iter());
        let stderr = self
            .err_reader
            .take()
            .map(|h| h.join().expect("stderr reader"))
            .unwrap_or_default();
        Finished {
            lines: self.lines,
            stderr,
            status,
        }
    }
}
