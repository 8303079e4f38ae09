// SPDX-License-Identifier: GPL-2.0
//! The guest's devices that live in the VMM: a 16550 UART (`vm-superio`) at COM1 whose
//! interrupt is an irqfd on ISA IRQ 4, and nothing else (the PICs, the I/O APIC, the local
//! APICs and the PIT are KVM's). The console output is printed with a prefix and kept, line by
//! line, for the VMM's checks.

use serde::{Deserialize, Serialize};
use std::io::{self, Write};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

pub const COM1: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;

/// The serial interrupt: an eventfd KVM listens on (irqfd).
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The guest console: every complete line, in order, with the time it arrived. The lines are
/// printed by a thread of their own: a vCPU never waits for the VMM's output.
pub struct Console {
    lines: Mutex<Vec<(Instant, String)>>,
    partial: Mutex<Vec<u8>>,
    arrived: Condvar,
    printer: Mutex<mpsc::Sender<Print>>,
}

enum Print {
    Line(String),
    /// Everything before has been printed.
    Flushed(mpsc::Sender<()>),
}

impl Console {
    /// A console that continues a line the guest had started writing (empty for a new one).
    pub fn continuing(partial: Vec<u8>) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for p in rx {
                match p {
                    Print::Line(line) => {
                        crate::out_line(format_args!("guest{}: {line}", crate::name_suffix()))
                    }
                    Print::Flushed(done) => {
                        let _ = io::stdout().flush();
                        let _ = done.send(());
                    }
                }
            }
        });
        Self {
            lines: Mutex::default(),
            partial: Mutex::new(partial),
            arrived: Condvar::new(),
            printer: Mutex::new(tx),
        }
    }

    /// Takes what the guest wrote, line by line.
    pub fn push(&self, bytes: &[u8]) {
        let mut partial = self.partial.lock().unwrap();
        for &b in bytes {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&partial)
                    .trim_end_matches('\r')
                    .to_string();
                partial.clear();
                let _ = self.printer.lock().unwrap().send(Print::Line(line.clone()));
                self.lines.lock().unwrap().push((Instant::now(), line));
                self.arrived.notify_all();
            } else {
                partial.push(b);
            }
        }
    }

    /// Waits until every line so far is printed.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        if self
            .printer
            .lock()
            .unwrap()
            .send(Print::Flushed(tx))
            .is_ok()
        {
            let _ = rx.recv();
        }
    }

    /// What the guest wrote of a line it has not ended yet.
    pub fn partial(&self) -> Vec<u8> {
        self.partial.lock().unwrap().clone()
    }

    /// Number of lines so far.
    pub fn len(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    /// Lines from index `from` on.
    pub fn since(&self, from: usize) -> Vec<String> {
        let lines = self.lines.lock().unwrap();
        lines[from.min(lines.len())..]
            .iter()
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// Waits until `pred` holds for the lines from index `from` on, or `timeout` passes.
    pub fn wait_for(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&[String]) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let mut lines = self.lines.lock().unwrap();
        loop {
            let tail: Vec<String> = lines[from.min(lines.len())..]
                .iter()
                .map(|(_, l)| l.clone())
                .collect();
            if pred(&tail) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            lines = self.arrived.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }
}

/// Where the UART writes: the console.
pub struct ConsoleOut(pub Arc<Console>);

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stdout().flush()
    }
}

pub type Uart = Serial<IrqTrigger, NoEvents, ConsoleOut>;

/// The registers and input FIFO of the UART, saved with the VM.
#[derive(Serialize, Deserialize)]
#[cfg_attr(test, derive(Default))]
pub struct UartState {
    regs: [u8; 9],
    in_buffer: Vec<u8>,
}

impl UartState {
    pub fn save(uart: &Uart) -> Self {
        let s = uart.state();
        Self {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    pub fn restore(&self, trigger: IrqTrigger, out: ConsoleOut) -> io::Result<Uart> {
        let r = self.regs;
        let state = SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: self.in_buffer.clone(),
        };
        Serial::from_state(&state, trigger, NoEvents, out)
            .map_err(|e| io::Error::other(format!("serial state: {e:?}")))
    }
}

/// Port I/O from the guest: the UART, and nothing else (reads of other ports see 0xff).
pub struct PortIo {
    pub uart: Mutex<Uart>,
}

impl PortIo {
    pub fn read(&self, port: u16, data: &mut [u8]) {
        if (COM1..COM1 + 8).contains(&port) && data.len() == 1 {
            data[0] = self.uart.lock().unwrap().read((port - COM1) as u8);
        } else {
            data.fill(0xff);
        }
    }

    pub fn write(&self, port: u16, data: &[u8]) {
        if (COM1..COM1 + 8).contains(&port) && data.len() == 1 {
            // A UART write fails only when the interrupt cannot be raised; the guest's
            // driver copes with a lost interrupt (it polls on timeout).
            let _ = self
                .uart
                .lock()
                .unwrap()
                .write((port - COM1) as u8, data[0]);
        }
    }

    /// Types `text` on the guest's console.
    pub fn type_in(&self, text: &str) -> io::Result<()> {
        self.uart
            .lock()
            .unwrap()
            .enqueue_raw_bytes(text.as_bytes())
            .map(|_| ())
            .map_err(|e| io::Error::other(format!("serial input: {e:?}")))
    }
}
