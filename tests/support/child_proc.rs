//! A child process of the test binary that answers line commands: the
//! parent writes a command to its stdin, the child answers on stdout with a
//! line starting `@@ ` (libtest may have started that line already). Used by
//! `coord_child.rs` and `manager_child.rs`, which say what the commands are.
#![allow(dead_code)]

use std::fmt::Debug;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::Duration;

/// How long a child may take to answer one command.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(40);

/// A running child, killed (and reaped) when dropped.
pub struct ChildProc<M> {
    pub mode: M,
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl<M: Debug> ChildProc<M> {
    /// The test binary, running only its test `entry` (which turns into the
    /// child's main loop when the command's environment says so).
    pub fn command(entry: &str) -> Command {
        let mut command = Command::new(std::env::current_exe().expect("test binary"));
        command.args([entry, "--exact", "--nocapture", "--test-threads=1"]);
        command
    }

    /// Starts `command` and waits for the child's `ready`.
    pub fn start(mut command: Command, mode: M) -> Self {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take().expect("stdin");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest may have started the line ("test name ... ").
                if let Some(at) = line.find("@@ ") {
                    if tx.send(line[at + 3..].to_owned()).is_err() {
                        break;
                    }
                }
            }
        });
        let mut proc = ChildProc {
            mode,
            child,
            stdin,
            lines,
        };
        assert_eq!(proc.recv(), "ready", "child did not start");
        proc
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends one command (without waiting for the answer).
    pub fn send(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").expect("write to child");
        self.stdin.flush().expect("flush child stdin");
    }

    /// The next answer; panics if none comes within [`ANSWER_TIMEOUT`].
    pub fn recv(&mut self) -> String {
        match self.lines.recv_timeout(ANSWER_TIMEOUT) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => panic!(
                "child {} ({:?}) did not answer in {ANSWER_TIMEOUT:?}",
                self.pid(),
                self.mode
            ),
            Err(RecvTimeoutError::Disconnected) => {
                panic!("child {} ({:?}) exited", self.pid(), self.mode)
            }
        }
    }

    /// Sends `command` and returns its answer.
    pub fn ask(&mut self, command: &str) -> String {
        self.send(command);
        self.recv()
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl<M> Drop for ChildProc<M> {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
