// SPDX-License-Identifier: GPL-2.0
//! `kvm-luo-ctl`: the operator's client of `kvm-luo-agent`.
//!
//! ```text
//! kvm-luo-ctl [--socket PATH] status
//! kvm-luo-ctl [--socket PATH] forget NAME
//! kvm-luo-ctl [--socket PATH] update [--kernel BZIMAGE [--initrd FILE] [--cmdline TEXT]]
//!                                    [--timeout SECONDS]
//! ```

use kvm_luo_agent::protocol::DEFAULT_SOCKET;
use kvm_luo_agent::Client;
use std::path::PathBuf;
use std::process::exit;
use std::time::Duration;

const USAGE: &str = "usage: kvm-luo-ctl [--socket PATH] status
       kvm-luo-ctl [--socket PATH] forget NAME   (a VM gone for good: updates stop waiting for it)
       kvm-luo-ctl [--socket PATH] update [--kernel BZIMAGE [--initrd FILE] [--cmdline TEXT]] [--timeout SECONDS]
  update without --kernel kexecs into the kernel already loaded (kexec -l)";

fn usage() -> ! {
    eprintln!("{USAGE}");
    exit(2)
}

fn main() {
    let mut socket = PathBuf::from(DEFAULT_SOCKET);
    let (mut kernel, mut initrd, mut cmdline) = (None, None, None);
    let mut timeout = 30.0;
    let mut command = None;
    let mut name = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--socket" => socket = PathBuf::from(value()),
            "--kernel" => kernel = Some(value()),
            "--initrd" => initrd = Some(value()),
            "--cmdline" => cmdline = Some(value()),
            "--timeout" => timeout = value().parse().unwrap_or_else(|_| usage()),
            "status" | "update" | "forget" if command.is_none() => command = Some(arg),
            _ if command.as_deref() == Some("forget") && name.is_none() => name = Some(arg),
            _ => usage(),
        }
    }
    let client = Client::connect(&socket).unwrap_or_else(|e| {
        eprintln!("kvm-luo-ctl: {e} (is kvm-luo-agent running?)");
        exit(1)
    });
    match command.as_deref() {
        Some("status") => {
            let s = client.status().unwrap_or_else(|e| {
                eprintln!("kvm-luo-ctl: {e}");
                exit(1)
            });
            println!("update: {}", s.phase);
            println!(
                "sessions from the previous kernel not claimed yet: {}",
                if s.incoming.is_empty() {
                    "none".to_string()
                } else {
                    s.incoming.join(", ")
                }
            );
            if !s.kept.is_empty() {
                println!(
                    "of them, kept by the agent after a VMM went away before it got its session: {}",
                    s.kept.join(", ")
                );
            }
            if !s.lost.is_empty() {
                println!("VMs whose guests were lost: {}", s.lost.join(", "));
            }
            println!(
                "{:<16} {:>7}  {:<10} {:<9} detail",
                "VMM", "pid", "state", "session"
            );
            for v in s.vmms {
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
        Some("update") => {
            if kernel.is_none() && (initrd.is_some() || cmdline.is_some()) {
                usage();
            }
            let armed = client
                .update(
                    kernel.as_deref(),
                    initrd.as_deref(),
                    cmdline.as_deref(),
                    Duration::from_secs_f64(timeout),
                )
                .unwrap_or_else(|e| {
                    eprintln!("kvm-luo-ctl: update refused: {e}");
                    exit(1)
                });
            println!("ready: {}; kexec", armed.vmms.join(", "));
            let e = armed.commit();
            eprintln!("kvm-luo-ctl: the kexec failed: {e}");
            exit(1)
        }
        Some("forget") => {
            let name = name.unwrap_or_else(|| usage());
            if let Err(e) = client.forget(&name) {
                eprintln!("kvm-luo-ctl: {e}");
                exit(1)
            }
            println!("forgot {name}");
        }
        _ => usage(),
    }
}
