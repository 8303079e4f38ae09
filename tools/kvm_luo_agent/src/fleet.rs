// SPDX-License-Identifier: GPL-2.0
//! What the agent knows about its VMMs and where an update stands, without any I/O: the
//! agent binary holds it under a lock and does the I/O around it. Generic over the session
//! type so that it can be tested without the device.

#[cfg(test)]
use kvm_luo_protocol::protocol::MAX_TEXT;
use kvm_luo_protocol::protocol::{bounded, Status, VmmState, VmmStatus};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// A connection's identity.
pub type ConnId = u64;

/// A request the fleet refuses, with the errno that says best why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The errno.
    pub errno: i32,
    /// What happened.
    pub message: String,
}

impl Refusal {
    fn new(errno: i32, message: impl Into<String>) -> Self {
        Self {
            errno,
            message: message.into(),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// A VMM's answer to the current update's prepare.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Answer {
    Waiting,
    Ready,
    NotReady(String),
}

/// One VMM.
#[derive(Debug)]
pub struct Vmm<S> {
    name: String,
    pid: u32,
    state: VmmState,
    detail: String,
    retrieved: bool,
    session: Option<S>,
    answer: Answer,
}

/// Where an update stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Idle,
    /// An operator's update owns the fleet; its VMMs are told to prepare.
    Preparing,
    /// Every VMM was ready.
    Armed,
    /// The kexec is under way.
    Committing,
}

/// The outcome of an update so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// Every VMM is ready.
    AllReady(Vec<String>),
    /// These VMMs have not answered yet.
    Waiting(Vec<String>),
    /// The update cannot happen.
    Refused(Refusal),
}

/// What a VMM's connection leaves behind when it goes ([`Fleet::disconnect`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Gone<S> {
    /// Its session, to close.
    Close(S),
    /// The previous kernel's session it had not released, kept for the next VMM: the VM.
    Kept(String),
    /// Nothing to do now.
    Nothing,
}

/// The VMMs, by connection, and the update.
#[derive(Debug)]
pub struct Fleet<S> {
    vmms: BTreeMap<ConnId, Vmm<S>>,
    /// What outlives a restart of the agent.
    registry: Registry,
    phase: Phase,
    /// VMMs that went away during an update, with their sessions: kept open (what they
    /// preserved is not dropped behind the update's back) until the update is over.
    gone: Vec<(String, Option<S>)>,
    /// Sessions of the previous kernel the agent took over for a VMM that went away before
    /// they could be handed to it: a session is retrieved only once, so the agent keeps them
    /// (still `incoming`) for the next VMM that asks.
    kept: BTreeMap<String, S>,
}

/// What the agent must not forget when it restarts (it keeps it in a file next to its
/// socket, which a kexec clears): the VMs it knows, the sessions of the previous kernel not
/// taken over yet, the VMs lost.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    /// Every VM whose VMM asked for a session, until an operator forgets it: an update waits
    /// for all of them to be connected.
    pub known: BTreeSet<String>,
    /// Sessions the previous kernel kept that no VMM has asked for yet.
    pub incoming: BTreeSet<String>,
    /// VMs whose session of the previous kernel could not be taken over, or whose VMM died
    /// while resuming from it: their guests are gone.
    pub lost: BTreeSet<String>,
    /// The user ID each VM belongs to: the one of the VMM that first asked for its session,
    /// until an operator forgets the VM. Kept across the kexec.
    #[serde(default)]
    pub owners: BTreeMap<String, u32>,
    /// The previous kernel's agent handed over something this agent could not read: sessions
    /// of the previous kernel may wait that it does not know. Updates are refused until an
    /// operator forgets [`kvm_luo_protocol::protocol::AGENT_SESSION`].
    #[serde(default)]
    pub handover_unread: bool,
}

/// The version of the registry's format this agent writes, and the latest it reads.
pub const REGISTRY_VERSION: u32 = 1;

/// The registry as it is kept in its file: with its format and the boot it belongs to.
#[derive(Serialize, Deserialize)]
struct StoredRegistry {
    #[serde(default = "kvm_luo_protocol::protocol::first_version")]
    version: u32,
    /// `/proc/sys/kernel/random/boot_id` of the kernel whose agent wrote it (absent from an
    /// older agent's, kept where a kexec clears it).
    #[serde(default)]
    boot_id: String,
    #[serde(flatten)]
    registry: Registry,
}

/// A registry read from its file.
#[derive(Debug, PartialEq, Eq)]
pub enum Stored {
    /// Kept by an agent of this kernel.
    ThisBoot(Registry),
    /// Kept by an agent of another boot (the file is somewhere a kexec does not clear): what
    /// it says is not this kernel's. Carries that boot's ID (empty: the file does not say).
    OtherBoot(String),
}

impl Registry {
    /// The content of the registry's file, for the kernel of `boot_id`.
    pub fn encode(&self, boot_id: &str) -> Vec<u8> {
        kvm_luo_protocol::protocol::encode(&StoredRegistry {
            version: REGISTRY_VERSION,
            boot_id: boot_id.into(),
            registry: self.clone(),
        })
    }

    /// Reads a registry's file in the kernel of `boot_id`: one of another boot, or that does not
    /// say its boot (an older agent's), is not read further. What cannot be read is refused with
    /// what an operator should do about it.
    pub fn decode(data: &[u8], boot_id: &str) -> Result<Stored, String> {
        #[derive(Deserialize)]
        struct Boot {
            #[serde(default)]
            boot_id: String,
        }
        if let Ok(Boot { boot_id: kept }) = serde_json::from_slice(data) {
            if kept != boot_id {
                return Ok(Stored::OtherBoot(kept));
            }
        }
        let stored: StoredRegistry =
            kvm_luo_protocol::protocol::decode_versioned(data, REGISTRY_VERSION, "the registry")
                .map_err(|e| {
                    format!(
                        "{e}. It says which VMs this agent knows and who owns them: if a later \
                         agent wrote it, run that one; otherwise move the file aside and start \
                         this one again (it then knows no VM; each VMM claims its session again, \
                         and root claims those of the previous kernel not taken over yet)"
                    )
                })?;
        Ok(Stored::ThisBoot(stored.registry))
    }
}

impl<S> Fleet<S> {
    /// A fleet with no VMM connected yet, and what the agent knew. A VM the registry names
    /// without an owner (one kept by an agent that recorded none) is root's: the socket of such
    /// an agent was root's alone.
    pub fn new(mut registry: Registry) -> Self {
        let names: Vec<String> = registry
            .known
            .iter()
            .chain(&registry.incoming)
            .chain(&registry.lost)
            .cloned()
            .collect();
        for name in names {
            registry.owners.entry(name).or_insert(0);
        }
        Self {
            vmms: BTreeMap::new(),
            registry,
            phase: Phase::Idle,
            gone: Vec::new(),
            kept: BTreeMap::new(),
        }
    }

    /// What outlives a restart of the agent.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Whether a user was recorded for the VM `name`.
    pub fn has_owner(&self, name: &str) -> bool {
        self.registry.owners.contains_key(name)
    }

    /// Whether the previous kernel kept a session named `name` that no VMM took yet.
    pub fn is_incoming(&self, name: &str) -> bool {
        self.registry.incoming.contains(name)
    }

    /// The previous kernel's session `name` cannot be taken over: its guest is lost.
    pub fn mark_lost(&mut self, name: &str) {
        self.registry.incoming.remove(name);
        self.registry.lost.insert(name.into());
    }

    /// The previous kernel's session `name`, retrieved by the agent, is not taken over: it stays
    /// the previous kernel's, kept by the agent for the next VMM that may have it. Its owner is
    /// the one recorded, or `uid` if none is (the VMM it was retrieved for, or root for a
    /// session no user owns).
    pub fn keep(&mut self, name: &str, uid: u32, session: S) {
        self.registry.incoming.insert(name.into());
        self.registry.owners.entry(name.into()).or_insert(uid);
        // A name has one session of the previous kernel, retrieved once. Were one kept already,
        // dropping it would finish it: it stays open, for good, instead.
        if let Some(earlier) = self.kept.insert(name.into(), session) {
            std::mem::forget(earlier);
        }
    }

    /// The session of the previous kernel kept for `name` ([`Fleet::keep`]), if any: the
    /// caller hands it over and [`Fleet::attach`]es it, or keeps it again.
    pub fn take_kept(&mut self, name: &str) -> Option<S> {
        self.kept.remove(name)
    }

    /// An operator says the VM `name` is gone for good: updates stop waiting for it. Refused
    /// while a VMM of that name is connected. Returns the session of the previous kernel the
    /// agent kept for it, if any, to close (which frees what it preserved).
    pub fn forget(&mut self, name: &str) -> Result<Option<S>, Refusal> {
        if name == kvm_luo_protocol::protocol::AGENT_SESSION && self.registry.handover_unread {
            self.registry.handover_unread = false;
            return Ok(None);
        }
        if self.vmms.values().any(|v| v.name == name) {
            return Err(Refusal::new(
                libc::EBUSY,
                format!("the VMM of {name} is connected"),
            ));
        }
        let known = self.registry.known.remove(name);
        let incoming = self.registry.incoming.remove(name);
        let lost = self.registry.lost.remove(name);
        let owned = self.registry.owners.remove(name).is_some();
        if known || incoming || lost || owned {
            Ok(self.kept.remove(name))
        } else {
            Err(Refusal::new(libc::ENOENT, format!("no VM named {name}")))
        }
    }

    /// Connection `conn`, of a process of user `uid`, asks for the session `name`: checks that
    /// it may have it. The caller then obtains the session and gives it with [`Fleet::attach`].
    pub fn may_claim(&self, conn: ConnId, name: &str, uid: u32) -> Result<(), Refusal> {
        if let Some(&owner) = self.registry.owners.get(name) {
            if owner != uid {
                return Err(Refusal::new(
                    libc::EPERM,
                    format!("the VM {name} belongs to user {owner}"),
                ));
            }
        }
        if self.phase != Phase::Idle {
            return Err(Refusal::new(
                libc::EAGAIN,
                "an update is in progress: ask again when it is over",
            ));
        }
        if let Some(v) = self.vmms.get(&conn) {
            if v.name != name || v.session.is_some() {
                return Err(Refusal::new(
                    libc::EINVAL,
                    format!("this connection has the session {} already", v.name),
                ));
            }
        }
        if let Some((_, v)) = self
            .vmms
            .iter()
            .find(|(c, v)| **c != conn && v.name == name)
        {
            return Err(Refusal::new(
                libc::EBUSY,
                format!(
                    "the session {name} is held by another VMM (pid {}): asked twice",
                    v.pid
                ),
            ));
        }
        Ok(())
    }

    /// Records that `conn` holds the session `name` (after [`Fleet::may_claim`]).
    pub fn attach(
        &mut self,
        conn: ConnId,
        name: &str,
        pid: u32,
        uid: u32,
        session: S,
        retrieved: bool,
    ) {
        self.registry.incoming.remove(name);
        self.registry.known.insert(name.into());
        self.registry.owners.entry(name.into()).or_insert(uid);
        let (state, detail) = match self.vmms.remove(&conn) {
            Some(v) => (v.state, v.detail),
            None => (VmmState::Starting, String::new()),
        };
        self.vmms.insert(
            conn,
            Vmm {
                name: name.into(),
                pid,
                state,
                detail,
                retrieved,
                session: Some(session),
                answer: Answer::Waiting,
            },
        );
    }

    /// `conn` went away: forgets it and gives back its session to close. During an update
    /// the session stays open until the update is over, and the update is refused. The
    /// previous kernel's session of a VMM that goes away before it released it (it died while
    /// resuming, or before it even read the answer) is kept for the next VMM that asks: closing
    /// it would finish it, and free whatever of the guest is still in it. Files retrieved from
    /// a session stay in it until it is finished, so the next VMM retrieves them again.
    pub fn disconnect(&mut self, conn: ConnId) -> Gone<S> {
        let Some(vmm) = self.vmms.remove(&conn) else {
            return Gone::Nothing;
        };
        if self.phase != Phase::Idle {
            self.gone.push((vmm.name, vmm.session));
            return Gone::Nothing;
        }
        match vmm.session {
            Some(session) if vmm.retrieved => {
                let owner = self.registry.owners.get(&vmm.name).copied().unwrap_or(0);
                self.keep(&vmm.name, owner, session);
                Gone::Kept(vmm.name)
            }
            Some(session) => Gone::Close(session),
            None => Gone::Nothing,
        }
    }

    /// `conn` gives the previous kernel's session back ([`Fleet::disconnect`] would keep it
    /// too, but an agent that did not was a loss: the VMM asks first). Returns its name.
    pub fn give_back(&mut self, conn: ConnId) -> Result<String, Refusal> {
        let v = self
            .vmms
            .get_mut(&conn)
            .filter(|v| v.retrieved && v.session.is_some())
            .ok_or_else(|| {
                Refusal::new(
                    libc::EINVAL,
                    "this connection holds no session of the previous kernel",
                )
            })?;
        let (name, session) = (v.name.clone(), v.session.take());
        v.retrieved = false;
        self.vmms.remove(&conn);
        let owner = self.registry.owners.get(&name).copied().unwrap_or(0);
        if let Some(session) = session {
            self.keep(&name, owner, session);
        }
        Ok(name)
    }

    /// Whether `conn` is a VMM's connection.
    pub fn has_vmm(&self, conn: ConnId) -> bool {
        self.vmms.contains_key(&conn)
    }

    /// `conn` says how it is doing. Unknown connections are ignored.
    pub fn report(&mut self, conn: ConnId, state: VmmState, detail: String) {
        if let Some(v) = self.vmms.get_mut(&conn) {
            v.state = state;
            v.detail = bounded(detail);
        }
    }

    /// `conn` answers the prepare: ready (`Ok`) or not. Refused when no update waits for it.
    pub fn answer(&mut self, conn: ConnId, ready: Result<(), String>) -> Result<(), Refusal> {
        if self.phase != Phase::Preparing {
            return Err(Refusal::new(libc::EINVAL, "no update is being prepared"));
        }
        let v = self
            .vmms
            .get_mut(&conn)
            .ok_or_else(|| Refusal::new(libc::EINVAL, "ask for a session first"))?;
        // A VMM that said it cannot be updated is not taken back by a later "ready".
        if !matches!(v.answer, Answer::NotReady(_)) {
            v.answer = match ready {
                Ok(()) => Answer::Ready,
                Err(reason) => Answer::NotReady(bounded(reason)),
            };
        }
        Ok(())
    }

    /// Starts an update: the fleet belongs to it until it is armed and committed, or
    /// aborted. Returns the connections to tell to prepare. Refused while anything of the
    /// previous kernel is not taken over yet, or a VMM has no session of this kernel: an
    /// update then would lose it.
    pub fn begin_update(&mut self) -> Result<Vec<ConnId>, Refusal> {
        self.check_update()?;
        for v in self.vmms.values_mut() {
            v.answer = Answer::Waiting;
        }
        self.phase = Phase::Preparing;
        Ok(self.vmms.keys().copied().collect())
    }

    /// Whether [`Fleet::begin_update`] would start an update now; changes nothing.
    pub fn check_update(&self) -> Result<(), Refusal> {
        if self.phase != Phase::Idle {
            return Err(Refusal::new(
                libc::EBUSY,
                "an update is in progress already",
            ));
        }
        if self.registry.handover_unread {
            // Not EBUSY: it does not go away by itself, an operator must act.
            return Err(Refusal::new(
                libc::ENOTRECOVERABLE,
                format!(
                    "the previous kernel's agent handed over what this agent cannot read: \
                     sessions of the previous kernel may wait that it does not know, and an \
                     update now would lose them. Have root's VMMs claim them by name, then \
                     forget {} to let updates go on",
                    kvm_luo_protocol::protocol::AGENT_SESSION
                ),
            ));
        }
        if !self.registry.incoming.is_empty() {
            return Err(Refusal::new(
                libc::EBUSY,
                format!(
                    "no VMM has taken over {} of the previous kernel yet: an update now would lose it",
                    join(&self.registry.incoming)
                ),
            ));
        }
        let connected: BTreeSet<&String> = self.vmms.values().map(|v| &v.name).collect();
        let missing: Vec<&String> = self
            .registry
            .known
            .iter()
            .filter(|n| !connected.contains(n))
            .collect();
        if !missing.is_empty() {
            return Err(Refusal::new(
                libc::EAGAIN,
                format!(
                    "{} not connected (forget a VM that is gone for good)",
                    missing
                        .iter()
                        .map(|n| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        for v in self.vmms.values() {
            if !matches!(
                v.state,
                VmmState::Running | VmmState::Continued | VmmState::Resumed
            ) {
                return Err(Refusal::new(
                    libc::EAGAIN,
                    format!("{} is not running its guest yet ({:?})", v.name, v.state),
                ));
            }
            if v.session.is_none() {
                return Err(Refusal::new(
                    libc::EAGAIN,
                    format!("{} has no session yet", v.name),
                ));
            }
            if v.retrieved {
                return Err(Refusal::new(
                    libc::EAGAIN,
                    format!("{} is still resuming from the previous kernel", v.name),
                ));
            }
        }
        Ok(())
    }

    /// Gives the fleet back after [`Fleet::begin_update`] when no VMM was told anything yet;
    /// returns the sessions of VMMs that went away meanwhile, to close.
    pub fn unreserve(&mut self) -> Vec<S> {
        if self.phase == Phase::Preparing {
            self.phase = Phase::Idle;
        }
        self.gone.drain(..).filter_map(|(_, s)| s).collect()
    }

    /// Where the update stands.
    pub fn readiness(&self) -> Readiness {
        if let Some((name, _)) = self.gone.first() {
            return Readiness::Refused(Refusal::new(
                libc::ECONNRESET,
                format!("{name} went away during the update"),
            ));
        }
        let mut waiting = Vec::new();
        for v in self.vmms.values() {
            match &v.answer {
                Answer::Waiting => waiting.push(v.name.clone()),
                Answer::NotReady(reason) => {
                    return Readiness::Refused(Refusal::new(
                        libc::ECANCELED,
                        format!("{} cannot be updated: {reason}", v.name),
                    ))
                }
                Answer::Ready => {}
            }
        }
        if waiting.is_empty() {
            Readiness::AllReady(self.names())
        } else {
            Readiness::Waiting(waiting)
        }
    }

    /// The refusal of an update whose VMMs did not all answer in time.
    pub fn timed_out(&self, secs: f64) -> Refusal {
        let waiting = match self.readiness() {
            Readiness::Waiting(w) => w.join(", "),
            _ => String::new(),
        };
        Refusal::new(
            libc::ETIMEDOUT,
            format!("{waiting} did not become ready within {secs:.0} s"),
        )
    }

    /// Every VMM ready: the update may go on.
    pub fn arm(&mut self) -> Result<Vec<String>, Refusal> {
        if self.phase != Phase::Preparing {
            return Err(Refusal::new(libc::EINVAL, "no update is being prepared"));
        }
        match self.readiness() {
            Readiness::AllReady(names) => {
                self.phase = Phase::Armed;
                Ok(names)
            }
            Readiness::Waiting(_) => Err(Refusal::new(libc::EAGAIN, "not every VMM is ready")),
            Readiness::Refused(r) => Err(r),
        }
    }

    /// Right before the kexec: checks the armed update still has every VMM it was armed
    /// with, and marks it under way (a VMM that goes away from now on leaves its session
    /// open, and it goes across).
    pub fn commit(&mut self) -> Result<(), Refusal> {
        if self.phase != Phase::Armed {
            return Err(Refusal::new(libc::EINVAL, "no update is armed"));
        }
        match self.readiness() {
            Readiness::AllReady(_) => {
                self.phase = Phase::Committing;
                Ok(())
            }
            Readiness::Waiting(w) => Err(Refusal::new(
                libc::EAGAIN,
                format!("{} not ready any more", w.join(", ")),
            )),
            Readiness::Refused(r) => Err(r),
        }
    }

    /// The update will not happen: returns the connections to tell, and the sessions to
    /// close (each VMM gets a new one when it asks again), those of VMMs that went away too.
    pub fn abort(&mut self) -> (Vec<ConnId>, Vec<S>) {
        self.phase = Phase::Idle;
        let mut sessions: Vec<S> = self.gone.drain(..).filter_map(|(_, s)| s).collect();
        for v in self.vmms.values_mut() {
            v.answer = Answer::Waiting;
            sessions.extend(v.session.take());
        }
        (self.vmms.keys().copied().collect(), sessions)
    }

    /// `conn` closed its session (after an abort, or after finishing the previous kernel's):
    /// gives back the agent's copy to close; the VMM stays known, without a session, until it
    /// asks for one again. Nothing happens during an update.
    pub fn release(&mut self, conn: ConnId) -> Result<Option<S>, Refusal> {
        if self.phase != Phase::Idle {
            return Err(Refusal::new(libc::EAGAIN, "an update is in progress"));
        }
        let v = self
            .vmms
            .get_mut(&conn)
            .ok_or_else(|| Refusal::new(libc::EINVAL, "this connection holds no session"))?;
        v.retrieved = false;
        Ok(v.session.take())
    }

    /// The names of the VMMs, in connection order.
    pub fn names(&self) -> Vec<String> {
        self.vmms.values().map(|v| v.name.clone()).collect()
    }

    /// What an operator sees.
    pub fn status(&self) -> Status {
        Status {
            vmms: self
                .vmms
                .values()
                .map(|v| VmmStatus {
                    name: v.name.clone(),
                    pid: v.pid,
                    state: v.state,
                    detail: v.detail.clone(),
                    retrieved: v.retrieved,
                    has_session: v.session.is_some(),
                })
                .collect(),
            incoming: self.registry.incoming.iter().cloned().collect(),
            kept: self.kept.keys().cloned().collect(),
            handover_unread: self.registry.handover_unread,
            lost: self.registry.lost.iter().cloned().collect(),
            phase: match self.phase {
                Phase::Idle => "idle",
                Phase::Preparing => "preparing",
                Phase::Armed => "armed",
                Phase::Committing => "committing",
            }
            .into(),
        }
    }
}

/// `kstrtobool()`, as the kernel reads `liveupdate=` and `kho=`: `None` if it reads neither.
fn kernel_bool(value: &[u8]) -> Option<bool> {
    match value.first()? {
        b'e' | b'E' | b'y' | b'Y' | b't' | b'T' | b'1' => Some(true),
        b'd' | b'D' | b'n' | b'N' | b'f' | b'F' | b'0' => Some(false),
        b'o' | b'O' => match value.get(1)? {
            b'n' | b'N' => Some(true),
            b'f' | b'F' => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// The kernel's `isspace()`.
fn kernel_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// The kernel's parameters in `cmdline`, as `next_arg()` (lib/cmdline.c) splits them: names
/// and values, quotes as it treats them, up to a bare `--` (what follows is init's).
fn kernel_params(cmdline: &str) -> Vec<(&[u8], Option<&[u8]>)> {
    let b = cmdline.as_bytes();
    let skip = |mut p: usize| {
        while p < b.len() && kernel_space(b[p]) {
            p += 1;
        }
        p
    };
    let mut params = Vec::new();
    let mut pos = skip(0);
    while pos < b.len() {
        let mut args = pos;
        let mut in_quote = false;
        let quoted = b[args] == b'"';
        if quoted {
            args += 1;
            in_quote = true;
        }
        let (mut i, mut equals) = (0, 0);
        while args + i < b.len() {
            let c = b[args + i];
            if kernel_space(c) && !in_quote {
                break;
            }
            if equals == 0 && c == b'=' {
                equals = i;
            }
            if c == b'"' {
                in_quote = !in_quote;
            }
            i += 1;
        }
        let last_is_quote = i > 0 && b[args + i - 1] == b'"';
        let value_quoted = equals != 0 && b.get(args + equals + 1) == Some(&b'"');
        // next_arg() cuts a closing quote off the value (or off a quoted name).
        let end = args
            + if last_is_quote && (value_quoted || quoted) {
                i - 1
            } else {
                i
            };
        let (name, value) = if equals == 0 {
            (&b[args..end], None)
        } else {
            let start = (args + equals + 1 + usize::from(value_quoted)).min(end);
            (&b[args..args + equals], Some(&b[start..end]))
        };
        if name == b"--" && value.is_none() {
            break;
        }
        params.push((name, value));
        pos = skip((args + i + 1).min(b.len()));
    }
    params
}

/// Refused unless a kernel booted with `next` keeps the sessions: LUO is off unless
/// `liveupdate=` turns it on (the last one counts, a value the kernel cannot read changes
/// nothing), and needs KHO. KHO is on by the kernel's configuration or by `kho=`: a next
/// command line without `kho=` is taken if this kernel's (`current`, which runs LUO) has none
/// either, the next kernel being configured as this one. Without this, every guest is lost
/// in the new kernel.
pub fn check_next_cmdline(next: &str, current: &str) -> Result<(), Refusal> {
    let last = |cmdline: &str, key: &[u8]| {
        kernel_params(cmdline)
            .into_iter()
            .filter(|(name, _)| *name == key)
            .filter_map(|(_, value)| kernel_bool(value?))
            .next_back()
    };
    if last(next, b"liveupdate") != Some(true) {
        return Err(Refusal::new(
            libc::EINVAL,
            "the next kernel's command line does not turn the Live Update Orchestrator on \
             (liveupdate=on): no session would reach it",
        ));
    }
    match (last(next, b"kho"), last(current, b"kho")) {
        (Some(true), _) | (None, None) => Ok(()),
        (Some(false), _) => Err(Refusal::new(
            libc::EINVAL,
            "the next kernel's command line turns Kexec HandOver off (kho=off): no session \
             would reach it",
        )),
        (None, Some(_)) => Err(Refusal::new(
            libc::EINVAL,
            "this kernel has Kexec HandOver on by its command line (kho=), the next kernel's \
             command line does not: add kho=on, or no session may reach it",
        )),
    }
}

fn join(names: &BTreeSet<String>) -> String {
    names
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(incoming: &[&str]) -> Registry {
        Registry {
            incoming: incoming.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn claim(f: &mut Fleet<u32>, conn: ConnId, session: u32, retrieved: bool) {
        let name = format!("vm{conn}");
        f.may_claim(conn, &name, 0).unwrap();
        f.attach(conn, &name, 100 + conn as u32, 0, session, retrieved);
    }

    /// Three VMMs running their guests, with sessions of this kernel (`conn * 10`).
    fn fleet3() -> Fleet<u32> {
        let mut f = Fleet::new(Registry::default());
        for conn in 1..=3 {
            claim(&mut f, conn, conn as u32 * 10, false);
            f.report(conn, VmmState::Running, String::new());
        }
        f
    }

    fn all_ready(f: &mut Fleet<u32>) {
        for c in 1..=3 {
            f.answer(c, Ok(())).unwrap();
        }
    }

    #[test]
    fn a_session_asked_for_twice_is_refused() {
        let f = fleet3();
        let e = f.may_claim(4, "vm2", 0).unwrap_err();
        assert_eq!(e.errno, libc::EBUSY);
        assert!(e.message.contains("pid 102"), "{e}");
        assert_eq!(f.may_claim(1, "vm7", 0).unwrap_err().errno, libc::EINVAL);
        assert_eq!(f.may_claim(1, "vm1", 0).unwrap_err().errno, libc::EINVAL);
        assert!(f.may_claim(4, "vm4", 0).is_ok());
    }

    #[test]
    fn the_previous_kernels_sessions_must_be_taken_over_before_an_update() {
        let mut f = Fleet::new(registry(&["vm1", "vm9"]));
        claim(&mut f, 1, 10, true);
        f.report(1, VmmState::Resumed, String::new());
        assert!(f.is_incoming("vm9") && !f.is_incoming("vm1"));
        let s = f.status();
        assert_eq!(s.incoming, vec!["vm9".to_string()]);
        assert!(s.vmms[0].retrieved && s.vmms[0].has_session);
        // vm9 was not taken over: an update would lose it.
        let e = f.begin_update().unwrap_err();
        assert_eq!(e.errno, libc::EBUSY);
        assert!(e.message.contains("vm9"), "{e}");
        // It cannot be: its guest is lost, and updates no longer wait for it.
        f.mark_lost("vm9");
        assert_eq!(f.status().lost, vec!["vm9".to_string()]);
        // vm1 still resumes from its retrieved session.
        assert_eq!(f.begin_update().unwrap_err().errno, libc::EAGAIN);
        // It finished it and released it: it needs a session of this kernel first.
        assert_eq!(f.release(1).unwrap(), Some(10));
        assert_eq!(f.begin_update().unwrap_err().errno, libc::EAGAIN);
        claim(&mut f, 1, 11, false);
        assert!(f.begin_update().is_ok());
    }

    #[test]
    fn a_vmm_that_dies_while_resuming_leaves_its_session_kept() {
        let mut reg = registry(&["vm1"]);
        reg.owners.insert("vm1".into(), 1000);
        let mut f = Fleet::new(reg);
        f.may_claim(1, "vm1", 1000).unwrap();
        f.attach(1, "vm1", 101, 1000, 10, true);
        // Closing it would finish it: it is kept, still its owner's, for the next VMM.
        assert_eq!(f.disconnect(1), Gone::Kept("vm1".into()));
        let s = f.status();
        assert_eq!(s.incoming, vec!["vm1".to_string()]);
        assert_eq!(s.kept, vec!["vm1".to_string()]);
        assert!(s.lost.is_empty());
        assert_eq!(f.may_claim(2, "vm1", 1001).unwrap_err().errno, libc::EPERM);
        // Updates wait for it until a VMM takes it or an operator forgets it.
        assert_eq!(f.begin_update().unwrap_err().errno, libc::EBUSY);
        assert_eq!(f.forget("vm1"), Ok(Some(10)));
        assert!(f.status().kept.is_empty());
        assert_eq!(f.forget("vm1").unwrap_err().errno, libc::ENOENT);
        assert!(f.begin_update().is_ok());
        // One that released it (finished, its guest runs) goes away as any other VMM.
        let mut f = Fleet::new(registry(&["vm1"]));
        claim(&mut f, 1, 10, true);
        assert_eq!(f.release(1), Ok(Some(10)));
        assert_eq!(f.disconnect(1), Gone::Nothing);
        assert!(f.status().kept.is_empty());
        // One that gives it back on purpose, and cannot give back what it does not hold.
        let mut f = Fleet::new(registry(&["vm1", "vm2"]));
        claim(&mut f, 1, 10, true);
        claim(&mut f, 2, 20, false);
        assert_eq!(f.give_back(2).unwrap_err().errno, libc::EINVAL);
        assert_eq!(f.give_back(1), Ok("vm1".into()));
        assert_eq!(f.status().kept, vec!["vm1".to_string()]);
        assert_eq!(f.give_back(1).unwrap_err().errno, libc::EINVAL);
        assert_eq!(f.disconnect(1), Gone::Nothing);
        assert_eq!(f.take_kept("vm1"), Some(10));
    }

    #[test]
    fn an_update_waits_for_every_known_vmm_running_its_guest() {
        let mut f = fleet3();
        // vm2's VMM went away (the agent restarted, or the VMM reconnects).
        assert_eq!(f.disconnect(2), Gone::Close(20));
        let e = f.begin_update().unwrap_err();
        assert_eq!(e.errno, libc::EAGAIN);
        assert!(e.message.starts_with("vm2 not connected"), "{e}");
        assert_eq!(f.forget("vm1").unwrap_err().errno, libc::EBUSY);
        f.may_claim(4, "vm2", 0).unwrap();
        f.attach(4, "vm2", 104, 0, 21, false);
        // Its guest still boots.
        let e = f.begin_update().unwrap_err();
        assert!(e.message.contains("not running its guest"), "{e}");
        f.report(4, VmmState::Continued, String::new());
        assert!(f.begin_update().is_ok());
    }

    #[test]
    fn an_update_arms_once_every_vmm_is_ready() {
        let mut f = fleet3();
        assert_eq!(f.arm().unwrap_err().errno, libc::EINVAL);
        assert_eq!(f.begin_update().unwrap(), vec![1, 2, 3]);
        assert_eq!(f.begin_update().unwrap_err().errno, libc::EBUSY);
        assert_eq!(f.may_claim(4, "vm4", 0).unwrap_err().errno, libc::EAGAIN);
        assert_eq!(f.release(1).unwrap_err().errno, libc::EAGAIN);
        f.answer(1, Ok(())).unwrap();
        f.answer(3, Ok(())).unwrap();
        assert_eq!(f.readiness(), Readiness::Waiting(vec!["vm2".into()]));
        assert_eq!(f.arm().unwrap_err().errno, libc::EAGAIN);
        let t = f.timed_out(10.0);
        assert_eq!(t.errno, libc::ETIMEDOUT);
        assert_eq!(t.message, "vm2 did not become ready within 10 s");
        f.answer(2, Ok(())).unwrap();
        assert_eq!(f.arm().unwrap(), vec!["vm1", "vm2", "vm3"]);
        assert_eq!(f.status().phase, "armed");
        f.commit().unwrap();
        assert_eq!(f.status().phase, "committing");
        assert_eq!(f.commit().unwrap_err().errno, libc::EINVAL);
    }

    #[test]
    fn an_update_that_loaded_nothing_gives_the_fleet_back() {
        let mut f = fleet3();
        f.begin_update().unwrap();
        // A VMM that went away meanwhile: its session is closed with the update.
        assert_eq!(f.disconnect(3), Gone::Nothing);
        assert_eq!(f.unreserve(), vec![30]);
        assert_eq!(f.status().phase, "idle");
        assert!(f.status().vmms.iter().all(|v| v.has_session));
        claim(&mut f, 3, 31, false);
        f.report(3, VmmState::Running, String::new());
        assert!(f.begin_update().is_ok());
    }

    #[test]
    fn one_vmm_not_ready_or_gone_refuses_the_update() {
        let mut f = fleet3();
        f.begin_update().unwrap();
        f.answer(2, Err("its guest failed".into())).unwrap();
        // A later "ready" does not take it back.
        f.answer(2, Ok(())).unwrap();
        f.answer(1, Ok(())).unwrap();
        f.answer(3, Ok(())).unwrap();
        match f.readiness() {
            Readiness::Refused(r) => {
                assert_eq!(r.errno, libc::ECANCELED);
                assert!(r.message.contains("vm2 cannot be updated"), "{r}");
            }
            r => panic!("{r:?}"),
        }
        assert!(f.arm().is_err());
        let (conns, sessions) = f.abort();
        assert_eq!(conns, vec![1, 2, 3]);
        assert_eq!(sessions, vec![10, 20, 30]);
        assert_eq!(f.status().phase, "idle");
        assert!(f.status().vmms.iter().all(|v| !v.has_session));

        // A VMM that goes away during an update: its session stays open until the update
        // is over, and the update is refused.
        let mut f = fleet3();
        f.begin_update().unwrap();
        f.answer(1, Ok(())).unwrap();
        assert_eq!(f.disconnect(3), Gone::Nothing);
        f.answer(2, Ok(())).unwrap();
        assert_eq!(f.arm().unwrap_err().errno, libc::ECONNRESET);
        let (conns, mut sessions) = f.abort();
        sessions.sort();
        assert_eq!(conns, vec![1, 2]);
        assert_eq!(sessions, vec![10, 20, 30]);
        // Outside an update, its session is closed at once.
        f.release(1).unwrap();
        claim(&mut f, 1, 11, false);
        assert_eq!(f.disconnect(1), Gone::Close(11));
    }

    #[test]
    fn a_vmm_gone_after_arming_stops_the_commit() {
        let mut f = fleet3();
        f.begin_update().unwrap();
        all_ready(&mut f);
        f.arm().unwrap();
        assert_eq!(f.disconnect(2), Gone::Nothing);
        assert_eq!(f.commit().unwrap_err().errno, libc::ECONNRESET);
        let (_, sessions) = f.abort();
        assert_eq!(sessions.len(), 3);

        // Once committing, a VMM that goes away leaves its session to go across.
        let mut f = fleet3();
        f.begin_update().unwrap();
        all_ready(&mut f);
        f.arm().unwrap();
        f.commit().unwrap();
        assert_eq!(f.disconnect(1), Gone::Nothing);
    }

    #[test]
    fn after_an_abort_each_vmm_claims_a_new_session() {
        let mut f = fleet3();
        f.begin_update().unwrap();
        let (_, closed) = f.abort();
        assert_eq!(closed.len(), 3);
        // Without a session, no update can start until each VMM is back.
        assert_eq!(f.begin_update().unwrap_err().errno, libc::EAGAIN);
        assert_eq!(f.release(2).unwrap(), None);
        assert_eq!(f.release(9).unwrap_err().errno, libc::EINVAL);
        for c in 1..=3 {
            claim(&mut f, c, c as u32, false);
        }
        assert!(f.begin_update().is_ok());
    }

    #[test]
    fn answers_outside_an_update_are_refused_and_texts_are_bounded() {
        let mut f = fleet3();
        assert_eq!(f.answer(1, Ok(())).unwrap_err().errno, libc::EINVAL);
        f.begin_update().unwrap();
        assert_eq!(f.answer(9, Ok(())).unwrap_err().errno, libc::EINVAL);
        f.report(9, VmmState::Ready, String::new());
        f.report(1, VmmState::Ready, "é\u{1}".repeat(1000));
        let s = f.status();
        assert_eq!(s.vmms[0].state, VmmState::Ready);
        assert!(s.vmms[0].detail.len() <= MAX_TEXT);
        assert!(!s.vmms[0].detail.contains('\u{1}'));
        f.answer(2, Err("x".repeat(100_000))).unwrap();
        match f.readiness() {
            Readiness::Refused(r) => assert!(r.message.len() < MAX_TEXT + 100),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn a_vm_belongs_to_the_user_who_first_claimed_it() {
        let mut f = Fleet::new(Registry::default());
        f.may_claim(1, "vm1", 1000).unwrap();
        f.attach(1, "vm1", 101, 1000, 10, false);
        assert_eq!(f.disconnect(1), Gone::Close(10));
        let e = f.may_claim(2, "vm1", 1001).unwrap_err();
        assert_eq!(e.errno, libc::EPERM);
        assert_eq!(e.message, "the VM vm1 belongs to user 1000");
        assert_eq!(f.may_claim(2, "vm1", 0).unwrap_err().errno, libc::EPERM);
        f.may_claim(2, "vm1", 1000).unwrap();
        // A claim does not change the owner; forgetting the VM does.
        f.attach(2, "vm1", 102, 1001, 20, false);
        assert_eq!(f.registry().owners.get("vm1"), Some(&1000));
        assert_eq!(f.disconnect(2), Gone::Close(20));
        f.forget("vm1").unwrap();
        f.may_claim(3, "vm1", 1001).unwrap();
        // Registries and handovers written before owners were kept still read, and what
        // they name is root's (their agent's socket was root's alone).
        let old: Registry =
            kvm_luo_protocol::protocol::decode(br#"{"known":["a"],"incoming":["b"],"lost":[]}"#)
                .unwrap();
        assert!(old.owners.is_empty());
        let f: Fleet<u32> = Fleet::new(old);
        assert_eq!(f.may_claim(1, "a", 1000).unwrap_err().errno, libc::EPERM);
        assert_eq!(f.may_claim(1, "b", 1000).unwrap_err().errno, libc::EPERM);
        f.may_claim(1, "b", 0).unwrap();
        assert!(!f.has_owner("c"));
        let h: kvm_luo_protocol::protocol::Handover =
            kvm_luo_protocol::protocol::decode(br#"{"sessions":["b"]}"#).unwrap();
        assert!(h.owners.is_empty());
    }

    #[test]
    fn the_registry_file_says_its_format_and_boot() {
        let mut reg = registry(&["vm1"]);
        reg.owners.insert("vm1".into(), 1000);
        let data = reg.encode("boot-a");
        let text = String::from_utf8(data.clone()).unwrap();
        assert!(
            text.starts_with(r#"{"version":1,"boot_id":"boot-a","#),
            "{text}"
        );
        assert_eq!(
            Registry::decode(&data, "boot-a"),
            Ok(Stored::ThisBoot(reg.clone()))
        );
        // Another boot's (kept where a kexec does not clear it): not this kernel's.
        assert_eq!(
            Registry::decode(&data, "boot-b"),
            Ok(Stored::OtherBoot("boot-a".into()))
        );
        // An older agent's, without boot: not known to be this boot's.
        let old = br#"{"known":["a"],"incoming":[],"lost":[]}"#;
        assert_eq!(
            Registry::decode(old, "boot-a"),
            Ok(Stored::OtherBoot("".into()))
        );
        // Without a format: the first.
        let v1 = br#"{"boot_id":"boot-a","known":["a"],"incoming":[],"lost":[]}"#;
        match Registry::decode(v1, "boot-a") {
            Ok(Stored::ThisBoot(r)) => assert!(r.known.contains("a") && !r.handover_unread),
            r => panic!("{r:?}"),
        }
        // Another boot's is not read further, whatever its format.
        let other = text
            .replacen(r#""version":1"#, r#""version":9"#, 1)
            .replacen("boot-a", "boot-c", 1);
        assert_eq!(
            Registry::decode(other.as_bytes(), "boot-a"),
            Ok(Stored::OtherBoot("boot-c".into()))
        );
        // A later format, and a corrupt file: refused, with what to do.
        let later = text.replacen(r#""version":1"#, r#""version":2"#, 1);
        let e = Registry::decode(later.as_bytes(), "boot-a").unwrap_err();
        assert!(e.starts_with("the registry is of format 2"), "{e}");
        assert!(e.contains("move the file aside"), "{e}");
        let e = Registry::decode(&data[..data.len() / 2], "boot-a").unwrap_err();
        assert!(e.starts_with("the registry is not readable"), "{e}");
        assert!(e.contains("move the file aside"), "{e}");
    }

    #[test]
    fn a_session_not_handed_over_is_kept_for_the_next_vmm() {
        let mut f = Fleet::new(registry(&["vm1", "vm2"]));
        f.may_claim(1, "vm1", 0).unwrap();
        // The agent retrieved it for connection 1, which went away before the answer.
        f.keep("vm1", 0, 10);
        assert!(f.is_incoming("vm1"));
        let s = f.status();
        assert_eq!(s.kept, vec!["vm1".to_string()]);
        assert!(s.lost.is_empty());
        // An update would lose it.
        assert_eq!(f.begin_update().unwrap_err().errno, libc::EBUSY);
        // The next VMM that may have it gets it, as the previous kernel's.
        f.may_claim(2, "vm1", 0).unwrap();
        assert_eq!(f.take_kept("vm1"), Some(10));
        assert_eq!(f.take_kept("vm1"), None);
        f.attach(2, "vm1", 102, 0, 10, true);
        assert!(!f.is_incoming("vm1") && f.status().kept.is_empty());
        // Forgetting a VM gives back its kept session, to close.
        f.keep("vm2", 0, 20);
        assert_eq!(f.forget("vm2"), Ok(Some(20)));
        assert!(!f.is_incoming("vm2"));
        // A session no user owned, kept when a user asked for it: root's, not the next user's.
        f.keep("vm3", 0, 30);
        assert_eq!(f.may_claim(3, "vm3", 1000).unwrap_err().errno, libc::EPERM);
        f.may_claim(3, "vm3", 0).unwrap();
        // One kept for its owner stays its owner's.
        let mut f = Fleet::new(Registry::default());
        f.keep("vm4", 1000, 40);
        assert_eq!(f.may_claim(1, "vm4", 1001).unwrap_err().errno, libc::EPERM);
        f.may_claim(1, "vm4", 1000).unwrap();
    }

    #[test]
    fn a_handover_not_read_holds_updates_until_an_operator_says_so() {
        let mut f = fleet3();
        f.registry.handover_unread = true;
        let e = f.begin_update().unwrap_err();
        assert_eq!(e.errno, libc::ENOTRECOVERABLE);
        assert!(e.message.contains("forget kvm-luo-agent"), "{e}");
        assert!(f.status().handover_unread);
        assert_eq!(
            f.forget(kvm_luo_protocol::protocol::AGENT_SESSION),
            Ok(None)
        );
        assert!(!f.registry().handover_unread);
        assert!(f.begin_update().is_ok());
    }

    #[test]
    fn the_next_kernel_must_keep_the_sessions() {
        for ok in [
            "console=ttyS0 liveupdate=on",
            "liveupdate=1 kho=on",
            "liveupdate=off liveupdate=Y",
            "liveupdate=on liveupdate=bogus",
            "liveupdate=enable",
            "\"liveupdate=on\"",
            "liveupdate=\"on\"",
            "liveupdate=on \"--\" kho=off",
            "liveupdate=on kho=x",
            "a=\"b c\" liveupdate=on",
        ] {
            assert_eq!(check_next_cmdline(ok, ""), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "console=ttyS0",
            "liveupdate",
            "liveupdate=",
            "liveupdate=off",
            "liveupdate=on liveupdate=0",
            "liveupdate=on liveupdate=disable",
            "liveupdate=on liveupdate=\"off\"",
            "liveupdate=bogus",
            "xliveupdate=on",
            "foo=\"a liveupdate=on\"",
            "console=ttyS0 -- liveupdate=on",
            "liveupdate=on kho=off",
            "liveupdate=on kho=d",
            "liveupdate=on kho=\"off\"",
            "liveupdate=on \"kho=off\"",
            "liveupdate=on kho=on kho=N",
            "liveupdate=on foo=\"a -- b\" kho=off",
        ] {
            assert_eq!(
                check_next_cmdline(bad, "").unwrap_err().errno,
                libc::EINVAL,
                "{bad}"
            );
        }
        // KHO by this kernel's command line: the next one must say so too.
        assert!(check_next_cmdline("liveupdate=on", "kho=on liveupdate=on").is_err());
        assert_eq!(
            check_next_cmdline("liveupdate=on kho=on", "kho=on liveupdate=on"),
            Ok(())
        );
        assert_eq!(
            kernel_params(" a=\"x y\"  \"b\" c=\" -- d"),
            vec![
                (&b"a"[..], Some(&b"x y"[..])),
                (&b"b"[..], None),
                (&b"c"[..], Some(&b" -- d"[..]))
            ]
        );
    }

    #[test]
    fn the_status_of_many_vmms_fits_in_a_message() {
        let mut f = Fleet::new(Registry::default());
        for conn in 1..=200 {
            claim(&mut f, conn, 0, false);
            f.report(conn, VmmState::Running, "\"\\".repeat(MAX_TEXT));
        }
        let len = kvm_luo_protocol::protocol::encode(
            &kvm_luo_protocol::protocol::FromAgent::Status(f.status()),
        )
        .len();
        assert!(len < kvm_luo_protocol::protocol::MAX_MESSAGE, "{len}");
    }
}
