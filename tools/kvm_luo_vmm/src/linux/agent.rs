// SPDX-License-Identifier: GPL-2.0
//! The VMM under `kvm-luo-agent`: it gets its VM's session from the agent, resumes the guest
//! from it if the previous kernel kept it (boots it otherwise), and does what the agent says:
//! prepare (stop, save, preserve, say ready: the host may kexec), or abort (run the guest
//! again from where it stopped). Agent trouble never stops a guest; neither does a stop, a
//! save, a check or a finish that fails: the VMM says so, and the guest runs on.

use super::machine::{self, Guest};
use super::stages::{finish, hold};
use super::Opts;
use crate::{fail, say, tsc_hz};
use kvm_luo_protocol::protocol::{FromAgent, VmmState};
use kvm_luo_protocol::Client;
use liveupdate::{Session, SessionName};
use std::io;
use std::time::Duration;

/// How a VMM under the agent behaves.
pub struct AgentOpts {
    /// The agent's socket.
    pub socket: std::path::PathBuf,
    /// The session's name, one per VM.
    pub name: SessionName,
    /// Test hook: never answer the agent's prepare (a VMM that does not become ready).
    pub never_ready: bool,
}

/// Connects to the agent and gets this VM's session. Waits as long as it takes: agent
/// trouble never stops a guest.
fn agent_session(a: &AgentOpts) -> (Client, Session, bool) {
    let mut wait = Duration::from_millis(200);
    let mut tries = 0u32;
    loop {
        let got = Client::connect(&a.socket).and_then(|c| {
            let (s, retrieved) = c.session(&a.name)?;
            Ok((c, s, retrieved))
        });
        match got {
            Ok(x) => return x,
            Err(e) => {
                if tries.is_multiple_of(10) {
                    say(format!("waiting for a session from the agent: {e}"));
                }
                tries += 1;
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn tell(client: &Client, state: VmmState, detail: impl Into<String>) {
    if let Err(e) = client.report(state, detail) {
        say(format!("telling the agent: {e}"));
    }
}

/// A check of the guest that failed: said to the agent and in the log; the guest runs on.
fn report_checks(client: &Client, r: Result<(), String>, ok: VmmState, detail: &str) {
    match r {
        Ok(()) => tell(client, ok, detail),
        Err(e) => {
            say(format!("FAILED: {e}; the guest runs on"));
            tell(client, VmmState::Failed, e);
        }
    }
}

/// What came from the agent.
enum Heard {
    Event(FromAgent),
    /// The agent closed the connection: it is gone.
    Gone,
    /// The connection failed otherwise; this side cut it.
    Broken,
}

/// The agent's next event. Messages this VMM does not understand are skipped.
fn next_event(client: &Client) -> Heard {
    loop {
        match client.next_event() {
            Ok(Some(FromAgent::Unknown)) => {}
            Ok(Some(m)) => return Heard::Event(m),
            Ok(None) => return Heard::Gone,
            Err(kvm_luo_protocol::Error::Io(e)) if e.kind() == io::ErrorKind::InvalidData => {
                say(format!("skipping a message from the agent: {e}"));
            }
            Err(kvm_luo_protocol::Error::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                say(format!("from the agent: {e}; disconnecting"));
                client.disconnect();
                return Heard::Broken;
            }
        }
    }
}

/// How long a VMM whose agent went away while it was ready keeps its guest stopped without an
/// answer from any agent: one that died while committing has a kexec under way.
const AGENT_SILENCE: Duration = Duration::from_secs(30);

/// After the connection to the agent ended while this VMM was ready: waits while an update
/// that may still carry its session is armed or under way (an agent that lost a VMM refuses
/// to commit, but one already committing kexecs), and returns once none is, or once no agent
/// has answered for [`AGENT_SILENCE`]. The guest must not run again before.
fn wait_update_off(a: &AgentOpts) {
    let mut silent_since = None;
    loop {
        match Client::connect(&a.socket).and_then(|c| c.status()) {
            Ok(s) if s.phase == "armed" || s.phase == "committing" => {
                silent_since = None;
                say(format!(
                    "the update is {}: the guest stays stopped",
                    s.phase
                ));
            }
            Ok(_) => return,
            Err(e) => {
                let since = *silent_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() >= AGENT_SILENCE {
                    say(format!(
                        "no agent answered for {} s ({e}): no update is under way",
                        AGENT_SILENCE.as_secs()
                    ));
                    return;
                }
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// After this VMM closed its session: tell the agent and get a new one, from a new
/// connection (or a new agent) if that fails.
fn renew(client: Client, a: &AgentOpts) -> (Client, Session) {
    let again = client.release().and_then(|()| client.session(&a.name));
    match again {
        Ok((session, _)) => (client, session),
        Err(e) => {
            say(format!("a new session: {e}; connecting again"));
            // The agent must see this connection go, or it keeps the name for it.
            client.disconnect();
            drop(client);
            loop {
                match agent_session(a) {
                    (c, s, false) => break (c, s),
                    // The previous kernel's, which this VMM has finished already (the agent
                    // kept it when this connection went before its release): given back as
                    // released, and a new one asked for.
                    (c, s, true) => {
                        drop(s);
                        if let Err(e) = c.release() {
                            say(format!("releasing the finished session: {e}"));
                        }
                        c.disconnect();
                    }
                }
            }
        }
    }
}

/// Resumes the guest from the previous kernel's session, finishes that session while the
/// guest runs, and gets a session of this kernel for the next update. A restore that cannot
/// be completed holds everything, unfinished, for good.
fn resume(
    opts: &Opts,
    a: &AgentOpts,
    client: Client,
    session: Session,
) -> (Guest, Client, Session) {
    tell(
        &client,
        VmmState::Starting,
        "restoring its guest from the previous kernel",
    );
    let (mut g, snap, _) = match machine::restore(&session, opts.clock, "") {
        Ok(r) => r,
        // Given back only if the agent says it keeps it (an agent that did not would finish
        // the session when this VMM goes); held otherwise.
        Err(held)
            if held.untouched && {
                tell(
                    &client,
                    VmmState::Failed,
                    format!(
                        "cannot restore the guest ({}); giving its session back",
                        held.why
                    ),
                );
                client.give_back().is_ok()
            } =>
        {
            say(format!(
                "FAILED: cannot restore the guest ({}); its session went back to the agent as \
                 it is, for a VMM that can",
                held.why
            ));
            drop((held, session));
            client.disconnect();
            std::process::exit(1)
        }
        Err(held) => {
            tell(
                &client,
                VmmState::Failed,
                format!(
                    "cannot restore the guest ({}); its session is held",
                    held.why
                ),
            );
            hold(&session, held, None)
        }
    };
    // Finishing waits for the guest's memory to be back, for as long as it takes (touching
    // what nothing used yet after the first wait, in case the kernel puts memory back on use
    // only).
    if let Err(e) = finish(&session, opts.finish_timeout, &g, true, "") {
        say(format!(
            "{e}: closing the previous kernel's session, which finishes it (every file in it \
             is retrieved); the guest runs on"
        ));
        tell(&client, VmmState::Failed, e);
    }
    // The next update needs a session of this kernel. The agent hears of the release before
    // this copy is closed: were this VMM to die in between, it keeps no finished session.
    let (client, new_session) = renew(client, a);
    drop(session);
    let session = new_session;
    say("finished the previous kernel's session; a new one for the next update");
    let r = g.check_went_on(&snap.progress, &snap.stamps, opts.clock, 0, "");
    report_checks(
        &client,
        r,
        VmmState::Resumed,
        "guest resumed after the live update, checks pass",
    );
    (g, client, session)
}

/// A VMM under `kvm-luo-agent`: gets its session from the agent; if it came from the previous
/// kernel, resumes the guest from it, otherwise boots the guest; then does what the agent
/// says. If the agent goes away, the guest goes on and the VMM waits for an agent again.
/// Returns only on failure.
pub fn serve(opts: &Opts, a: &AgentOpts) {
    let hz = tsc_hz();
    let (mut client, mut session, retrieved) = agent_session(a);
    let mut guest = if retrieved {
        let (g, c, s) = resume(opts, a, client, session);
        (client, session) = (c, s);
        g
    } else {
        tell(&client, VmmState::Starting, "booting its guest");
        let g = machine::boot(opts, "").unwrap_or_else(|e| {
            tell(&client, VmmState::Failed, e.clone());
            fail(e)
        });
        tell(&client, VmmState::Running, "guest booted, checks pass");
        g
    };
    loop {
        match next_event(&client) {
            Heard::Event(FromAgent::Prepare) if a.never_ready => {
                say("the agent asks to prepare; this VMM never answers (--never-ready)");
            }
            Heard::Event(FromAgent::Prepare) => {
                tell(
                    &client,
                    VmmState::Preparing,
                    "stopping and preserving its guest",
                );
                let mut stopped = match guest.stop(hz) {
                    Ok(s) => s,
                    Err(failed) => {
                        let (g, e) = *failed;
                        // The guest runs again: the update is refused, nothing else happens.
                        say(format!("cannot be updated: {e}; the guest runs again"));
                        guest = g;
                        let _ = client.ready(Err(e));
                        tell(
                            &client,
                            VmmState::Running,
                            "the update is refused; the guest runs on",
                        );
                        continue;
                    }
                };
                let state_fd = match stopped.preserve(&session, false) {
                    Ok(f) => {
                        let p = &stopped.snapshot.progress;
                        say(format!(
                            "paused at heartbeat {} (guest clock {:.3} s), generations {:?}; \
                             preserved the VM, {} and its state; ready",
                            p.beat,
                            p.mono,
                            p.generations,
                            super::guest_memfds(stopped.m.ram.len())
                        ));
                        stopped.m.console.flush();
                        tell(&client, VmmState::Ready, "everything preserved");
                        let _ = client.ready(Ok(()));
                        Some(f)
                    }
                    Err(e) => {
                        say(format!("cannot be updated: {e}"));
                        let _ = client.ready(Err(e.to_string()));
                        None
                    }
                };
                // The guest stays stopped until the kexec, or until the update is off.
                let (reason, agent_there) = loop {
                    match next_event(&client) {
                        Heard::Event(FromAgent::Abort { reason }) => break (reason, true),
                        Heard::Event(m) => say(format!("ignoring a message from the agent: {m:?}")),
                        Heard::Gone | Heard::Broken => {
                            wait_update_off(a);
                            break ("the connection to the agent ended".to_string(), false);
                        }
                    }
                };
                say(format!(
                    "the update is off ({reason}): closing the session, the guest goes on"
                ));
                // Closing the session (the agent closed its copy) unpreserves everything in it.
                drop(state_fd);
                drop(session);
                // With the agent there, a session for the next update first, then the guest;
                // without it the guest first: it does not wait for an agent.
                let renewed = if agent_there {
                    Some(renew(client, a))
                } else {
                    client.disconnect();
                    None
                };
                let checked;
                (guest, checked) = stopped
                    .go_on(opts.clock, "")
                    .unwrap_or_else(|e| fail(format!("running the guest again: {e}")));
                (client, session) = renewed.unwrap_or_else(|| {
                    let (c, s, _) = agent_session(a);
                    (c, s)
                });
                report_checks(
                    &client,
                    checked,
                    VmmState::Continued,
                    "guest went on after the update was off, checks pass",
                );
            }
            Heard::Event(FromAgent::Abort { reason }) => {
                say(format!(
                    "the update is off ({reason}); the guest was not stopped"
                ));
                drop(session);
                (client, session) = renew(client, a);
                tell(
                    &client,
                    VmmState::Continued,
                    "the update was off before this VMM prepared; the guest runs on",
                );
            }
            Heard::Event(m) => say(format!("ignoring a message from the agent: {m:?}")),
            Heard::Gone | Heard::Broken => {
                say("the agent went away (restarted?): the guest goes on; waiting for an agent");
                client.disconnect();
                drop(client);
                drop(session);
                let (c, s, _) = agent_session(a);
                (client, session) = (c, s);
                tell(&client, VmmState::Running, "guest runs, checks passed");
            }
        }
        if guest.running.any_failed() {
            fail("a vCPU stopped");
        }
    }
}
