// SPDX-License-Identifier: GPL-2.0
//! `kvm-luo-ctl`: the operator's client of `kvm-luo-agent`. `kvm-luo-ctl --help` says how to use
//! it; its exit codes are [`Exit`].

use clap::{Parser, Subcommand};
use kvm_luo_protocol::protocol::{Status, DEFAULT_SOCKET};
use kvm_luo_protocol::{Client, Error};
use std::path::PathBuf;
use std::process::exit;
use std::time::{Duration, Instant};

/// What `kvm-luo-ctl` exits with.
#[derive(Clone, Copy)]
enum Exit {
    /// The agent refused (the message says why), or the kexec failed.
    Refused = 1,
    /// The command line is wrong (clap's own code).
    Usage = 2,
    /// The agent cannot be reached, or it answered something unexpected.
    NoAgent = 3,
    /// `wait` ran out of time.
    TimedOut = 4,
}

const EXIT_CODES: &str = "Exit codes: 0 done; 1 the agent refused (the message says why) or the \
kexec failed; 2 wrong command line; 3 the agent cannot be reached; 4 `wait` ran out of time.";

#[derive(Parser)]
#[command(
    name = "kvm-luo-ctl",
    version,
    about = "Asks kvm-luo-agent, the live-update agent of a KVM host, for its status or for a \
             live update",
    after_help = EXIT_CODES
)]
struct Args {
    /// The agent's socket.
    #[arg(long, default_value = DEFAULT_SOCKET, global = true)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Shows the VMMs, their states, the previous kernel's sessions and the update's phase.
    Status {
        /// As one JSON object (the protocol's status).
        #[arg(long)]
        json: bool,
    },
    /// Kexecs into a new kernel once every VMM has preserved its guest.
    Update {
        /// The kernel to kexec into (the agent loads it with kexec_file_load, which hands the
        /// sessions over).
        #[arg(long, required = true)]
        kernel: Option<String>,
        /// Its initramfs.
        #[arg(long, requires = "kernel")]
        initrd: Option<String>,
        /// Its command line (default: this kernel's).
        #[arg(long, requires = "kernel")]
        cmdline: Option<String>,
        /// How long the VMMs have to preserve their guests, in seconds.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
        /// Makes every check of a real update (the VMMs, the kernel) and stops nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Waits until an update could start: every VM the agent knows has its VMM connected and
    /// its guest running, and no session of the previous kernel waits.
    Wait {
        /// How long to wait, in seconds.
        #[arg(long, default_value_t = 600.0)]
        timeout: f64,
    },
    /// Tells the agent a VM is gone for good: updates stop waiting for it. `forget kvm-luo-agent`
    /// says that what an unreadable handover named is gone.
    Forget {
        /// The VM's name.
        name: String,
    },
}

fn die(code: Exit, msg: impl std::fmt::Display) -> ! {
    eprintln!("kvm-luo-ctl: {msg}");
    exit(code as i32)
}

/// The exit code of an error from the agent.
fn code(e: &Error) -> Exit {
    match e {
        Error::Refused { .. } | Error::Session(_) => Exit::Refused,
        Error::Io(_) | Error::Protocol(_) => Exit::NoAgent,
    }
}

fn seconds(s: f64) -> Duration {
    Duration::try_from_secs_f64(s)
        .unwrap_or_else(|_| die(Exit::Usage, format!("{s} is not a number of seconds")))
}

fn print_status(s: &Status) {
    let list = |names: &[String]| {
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    };
    println!("update: {}", s.phase);
    println!(
        "sessions from the previous kernel not claimed yet: {}",
        list(&s.incoming)
    );
    if !s.kept.is_empty() {
        println!(
            "of them, retrieved and kept by the agent for the next VMM: {}",
            s.kept.join(", ")
        );
    }
    if s.handover_unread {
        println!(
            "the previous kernel's agent handed over what this agent cannot read: updates wait \
             for `kvm-luo-ctl forget kvm-luo-agent`"
        );
    }
    if !s.lost.is_empty() {
        println!("VMs whose guests were lost: {}", s.lost.join(", "));
    }
    println!(
        "{:<16} {:>7}  {:<10} {:<9} detail",
        "VMM", "pid", "state", "session"
    );
    for v in &s.vmms {
        let session = match (v.has_session, v.retrieved) {
            (false, _) => "none",
            (true, true) => "retrieved",
            (true, false) => "new",
        };
        println!(
            "{:<16} {:>7}  {:<10} {:<9} {}",
            v.name,
            v.pid,
            format!("{:?}", v.state).to_lowercase(),
            session,
            v.detail
        );
    }
}

fn main() {
    let args = Args::try_parse().unwrap_or_else(|e| {
        let _ = e.print();
        exit(if e.use_stderr() {
            Exit::Usage as i32
        } else {
            0
        })
    });
    let connect = || {
        Client::connect(&args.socket)
            .unwrap_or_else(|e| die(code(&e), format!("{e} (is kvm-luo-agent running?)")))
    };
    match args.command {
        Command::Status { json } => {
            let s = connect().status().unwrap_or_else(|e| die(code(&e), e));
            if json {
                println!(
                    "{}",
                    String::from_utf8_lossy(&kvm_luo_protocol::protocol::encode(&s))
                );
            } else {
                print_status(&s);
            }
        }
        Command::Update {
            kernel,
            initrd,
            cmdline,
            timeout,
            dry_run,
        } => {
            let client = connect();
            let (kernel, initrd, cmdline) =
                (kernel.as_deref(), initrd.as_deref(), cmdline.as_deref());
            if dry_run {
                let run = client
                    .update_dry_run(kernel, initrd, cmdline, seconds(timeout))
                    .unwrap_or_else(|e| die(code(&e), format!("an update would be refused: {e}")));
                let vmms = run.vmms;
                println!(
                    "an update would prepare {}",
                    if vmms.is_empty() {
                        "no VMM".to_string()
                    } else {
                        vmms.join(", ")
                    }
                );
                return;
            }
            let armed = client
                .update(kernel, initrd, cmdline, seconds(timeout))
                .unwrap_or_else(|e| die(code(&e), format!("update refused: {e}")));
            println!("ready: {}; kexec", armed.vmms.join(", "));
            let e = armed.commit();
            die(Exit::Refused, format!("the kexec failed: {e}"))
        }
        Command::Wait { timeout } => {
            let deadline = Instant::now()
                .checked_add(seconds(timeout))
                .unwrap_or_else(|| die(Exit::Usage, format!("{timeout} s is too long")));
            let mut last = String::new();
            let mut unreachable = false;
            loop {
                // The agent may not be up yet (after a kexec), or restarting: that is waited for.
                let check = Client::connect(&args.socket)
                    .and_then(|c| c.update_dry_run(None, None, None, Duration::ZERO));
                let waiting = match check {
                    Ok(run) => {
                        println!("ready for an update of {} VMMs", run.vmms.len());
                        return;
                    }
                    // What goes away by itself: VMMs not connected or not running yet, sessions
                    // of the previous kernel not taken over yet, an update in progress.
                    Err(Error::Refused { errno, message })
                        if errno == libc::EAGAIN || errno == libc::EBUSY =>
                    {
                        message
                    }
                    Err(e @ Error::Refused { .. }) => die(code(&e), e),
                    // Not an agent there, or not for this user: that does not go away.
                    Err(Error::Io(e))
                        if e.kind() == std::io::ErrorKind::PermissionDenied
                            || e.raw_os_error() == Some(libc::ENOTSOCK) =>
                    {
                        die(Exit::NoAgent, e)
                    }
                    Err(e @ (Error::Protocol(_) | Error::Session(_))) => die(Exit::NoAgent, e),
                    Err(e) => {
                        unreachable = true;
                        format!("{e}")
                    }
                };
                if waiting != last {
                    println!("waiting: {waiting}");
                    last = waiting;
                }
                if Instant::now() >= deadline {
                    let code = if unreachable {
                        Exit::NoAgent
                    } else {
                        Exit::TimedOut
                    };
                    die(code, format!("not ready after {timeout} s: {last}"));
                }
                unreachable = false;
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        Command::Forget { name } => {
            connect().forget(&name).unwrap_or_else(|e| die(code(&e), e));
            println!("forgot {name}");
        }
    }
}
