// SPDX-License-Identifier: GPL-2.0
//! What the agent knows about its VMMs and where an update stands, without any I/O: the
//! agent binary holds it under a lock and does the I/O around it. Generic over the session
//! type so that it can be tested without the device.

use crate::protocol::{Status, VmmState, VmmStatus};
use std::collections::BTreeMap;
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

/// The VMMs, by connection, and the update.
#[derive(Debug)]
pub struct Fleet<S> {
    vmms: BTreeMap<ConnId, Vmm<S>>,
    /// Sessions the previous kernel kept that no VMM has asked for yet.
    incoming: Vec<String>,
    /// Sessions from the previous kernel whose VMM went away before it released them: the
    /// next VMM that asks for the name gets them (a retrieve cannot be repeated).
    held: Vec<(String, S)>,
    phase: Phase,
    /// VMMs that went away during an update, with their sessions: kept open (what they
    /// preserved is not dropped behind the update's back) until the update is over.
    gone: Vec<(String, Option<S>)>,
}

/// The longest detail or reason the fleet keeps.
pub const MAX_TEXT: usize = 512;

/// `text`, cut to [`MAX_TEXT`] bytes at a character boundary.
pub fn bounded(mut text: String) -> String {
    if text.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

impl<S> Fleet<S> {
    /// A fleet with no VMM yet; `incoming` names the sessions the previous kernel preserved.
    pub fn new(incoming: Vec<String>) -> Self {
        Self {
            vmms: BTreeMap::new(),
            incoming,
            held: Vec::new(),
            phase: Phase::Idle,
            gone: Vec::new(),
        }
    }

    /// Connection `conn` asks for the session `name`: checks that it may have it. The
    /// caller then obtains the session (first [`Fleet::take_held`]) and gives it with
    /// [`Fleet::attach`].
    pub fn may_claim(&self, conn: ConnId, name: &str) -> Result<(), Refusal> {
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

    /// The previous kernel's session `name`, if its last VMM went away without releasing it.
    pub fn take_held(&mut self, name: &str) -> Option<S> {
        let i = self.held.iter().position(|(n, _)| n == name)?;
        Some(self.held.remove(i).1)
    }

    /// Records that `conn` holds the session `name` (after [`Fleet::may_claim`]).
    pub fn attach(&mut self, conn: ConnId, name: &str, pid: u32, session: S, retrieved: bool) {
        self.incoming.retain(|n| n != name);
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
    /// the session stays open until the update is over, and the update is refused. A session
    /// of the previous kernel is kept for the next VMM of that name.
    pub fn disconnect(&mut self, conn: ConnId) -> Option<S> {
        let vmm = self.vmms.remove(&conn)?;
        if self.phase != Phase::Idle {
            self.gone.push((vmm.name, vmm.session));
            return None;
        }
        match vmm.session {
            Some(s) if vmm.retrieved => {
                self.incoming.push(vmm.name.clone());
                self.held.push((vmm.name, s));
                None
            }
            s => s,
        }
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
        v.answer = match ready {
            Ok(()) => Answer::Ready,
            Err(reason) => Answer::NotReady(bounded(reason)),
        };
        Ok(())
    }

    /// Starts an update: the fleet belongs to it until it is armed and committed, or
    /// aborted. Returns the connections to tell to prepare. Refused while anything of the
    /// previous kernel is not taken over yet, or a VMM has no session of this kernel: an
    /// update then would lose it.
    pub fn begin_update(&mut self) -> Result<Vec<ConnId>, Refusal> {
        if self.phase != Phase::Idle {
            return Err(Refusal::new(
                libc::EBUSY,
                "an update is in progress already",
            ));
        }
        if !self.incoming.is_empty() {
            return Err(Refusal::new(
                libc::EBUSY,
                format!(
                    "no VMM has taken over {} of the previous kernel yet: an update now would lose it",
                    self.incoming.join(", ")
                ),
            ));
        }
        for v in self.vmms.values() {
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
        for v in self.vmms.values_mut() {
            v.answer = Answer::Waiting;
        }
        self.phase = Phase::Preparing;
        Ok(self.vmms.keys().copied().collect())
    }

    /// Gives the fleet back after [`Fleet::begin_update`] when no VMM was told anything yet.
    pub fn unreserve(&mut self) {
        if self.phase == Phase::Preparing {
            self.phase = Phase::Idle;
        }
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
            incoming: self.incoming.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Three VMMs with sessions of this kernel; session `n` is `conn * 10`.
    fn fleet3() -> Fleet<u32> {
        let mut f = Fleet::new(Vec::new());
        for conn in 1..=3 {
            let name = format!("vm{conn}");
            f.may_claim(conn, &name).unwrap();
            f.attach(conn, &name, 100 + conn as u32, conn as u32 * 10, false);
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
        let e = f.may_claim(4, "vm2").unwrap_err();
        assert_eq!(e.errno, libc::EBUSY);
        assert!(e.message.contains("pid 102"), "{e}");
        assert_eq!(f.may_claim(1, "vm7").unwrap_err().errno, libc::EINVAL);
        assert_eq!(f.may_claim(1, "vm1").unwrap_err().errno, libc::EINVAL);
        assert!(f.may_claim(4, "vm4").is_ok());
    }

    #[test]
    fn the_previous_kernels_sessions_must_be_taken_over_before_an_update() {
        let mut f: Fleet<u32> = Fleet::new(vec!["vm1".into(), "vm9".into()]);
        f.may_claim(1, "vm1").unwrap();
        f.attach(1, "vm1", 101, 10, true);
        let s = f.status();
        assert_eq!(s.incoming, vec!["vm9".to_string()]);
        assert!(s.vmms[0].retrieved && s.vmms[0].has_session);
        // vm9 was not taken over: an update would lose it.
        let e = f.begin_update().unwrap_err();
        assert_eq!(e.errno, libc::EBUSY);
        assert!(e.message.contains("vm9"), "{e}");
        f.may_claim(2, "vm9").unwrap();
        f.attach(2, "vm9", 102, 90, true);
        // vm1 still resumes from its retrieved session.
        assert_eq!(f.begin_update().unwrap_err().errno, libc::EAGAIN);
        // It finished it and released it: it needs a session of this kernel first.
        assert_eq!(f.release(1).unwrap(), Some(10));
        assert_eq!(f.begin_update().unwrap_err().errno, libc::EAGAIN);
        f.may_claim(1, "vm1").unwrap();
        f.attach(1, "vm1", 101, 11, false);
        f.release(2).unwrap();
        f.may_claim(2, "vm9").unwrap();
        f.attach(2, "vm9", 102, 91, false);
        assert_eq!(f.begin_update().unwrap(), vec![1, 2]);
    }

    #[test]
    fn a_vmm_that_dies_while_resuming_leaves_its_session_to_the_next() {
        let mut f: Fleet<u32> = Fleet::new(vec!["vm1".into()]);
        f.may_claim(1, "vm1").unwrap();
        f.attach(1, "vm1", 101, 10, true);
        assert_eq!(f.disconnect(1), None, "kept, not closed");
        assert_eq!(f.status().incoming, vec!["vm1".to_string()]);
        f.may_claim(2, "vm1").unwrap();
        assert_eq!(f.take_held("vm1"), Some(10));
        assert_eq!(f.take_held("vm1"), None);
        f.attach(2, "vm1", 102, 10, true);
        assert!(f.status().incoming.is_empty());
    }

    #[test]
    fn an_update_arms_once_every_vmm_is_ready() {
        let mut f = fleet3();
        assert_eq!(f.arm().unwrap_err().errno, libc::EINVAL);
        assert_eq!(f.begin_update().unwrap(), vec![1, 2, 3]);
        assert_eq!(f.begin_update().unwrap_err().errno, libc::EBUSY);
        assert_eq!(f.may_claim(4, "vm4").unwrap_err().errno, libc::EAGAIN);
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
        f.unreserve();
        assert_eq!(f.status().phase, "idle");
        assert!(f.status().vmms.iter().all(|v| v.has_session));
        assert!(f.begin_update().is_ok());
    }

    #[test]
    fn one_vmm_not_ready_or_gone_refuses_the_update() {
        let mut f = fleet3();
        f.begin_update().unwrap();
        f.answer(2, Err("its guest failed".into())).unwrap();
        match f.readiness() {
            Readiness::Refused(r) => {
                assert_eq!(r.errno, libc::ECANCELED);
                assert!(r.message.contains("vm2 cannot be updated"), "{r}");
            }
            r => panic!("{r:?}"),
        }
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
        assert_eq!(f.disconnect(3), None);
        f.answer(2, Ok(())).unwrap();
        assert_eq!(f.arm().unwrap_err().errno, libc::ECONNRESET);
        let (conns, mut sessions) = f.abort();
        sessions.sort();
        assert_eq!(conns, vec![1, 2]);
        assert_eq!(sessions, vec![10, 20, 30]);
        // Outside an update, its session is closed at once.
        f.release(1).unwrap();
        f.may_claim(1, "vm1").unwrap();
        f.attach(1, "vm1", 101, 11, false);
        assert_eq!(f.disconnect(1), Some(11));
    }

    #[test]
    fn a_vmm_gone_after_arming_stops_the_commit() {
        let mut f = fleet3();
        f.begin_update().unwrap();
        all_ready(&mut f);
        f.arm().unwrap();
        assert_eq!(f.disconnect(2), None);
        assert_eq!(f.commit().unwrap_err().errno, libc::ECONNRESET);
        let (_, sessions) = f.abort();
        assert_eq!(sessions.len(), 3);

        // Once committing, a VMM that goes away leaves its session to go across.
        let mut f = fleet3();
        f.begin_update().unwrap();
        all_ready(&mut f);
        f.arm().unwrap();
        f.commit().unwrap();
        assert_eq!(f.disconnect(1), None);
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
            f.may_claim(c, &format!("vm{c}")).unwrap();
            f.attach(c, &format!("vm{c}"), 100 + c as u32, c as u32, false);
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
        f.report(1, VmmState::Ready, "é".repeat(1000));
        let s = f.status();
        assert_eq!(s.vmms[0].state, VmmState::Ready);
        assert_eq!(s.vmms[0].detail.len(), MAX_TEXT);
        f.answer(2, Err("x".repeat(100_000))).unwrap();
        match f.readiness() {
            Readiness::Refused(r) => assert!(r.message.len() < MAX_TEXT + 100),
            r => panic!("{r:?}"),
        }
    }
}
