//! The terminal while `top` owns it: raw mode (keys come one at a time,
//! unechoed) and the alternate screen (the shell's screen comes back as it
//! was), both undone on every way out: a return (dropping the [`Screen`]),
//! an error (the same), and a panic, whose message would otherwise be
//! written into the alternate screen, in raw mode, and lost; so a panic
//! hook undoes them before the message is printed.
//!
//! Keys and resizes are read by a thread of their own (crossterm reads
//! block) and handed over as [`Input`]s.

use std::io::{self, Stdout};
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};

use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::cursor::{Hide, Show};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::crossterm::execute;
use ratatui::crossterm::terminal::{
    EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode,
};
use tokio::sync::mpsc;

use super::view::{self, Model};

/// Whether the terminal is in `top`'s state, to be put back.
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// The terminal in raw mode on the alternate screen, until dropped.
pub struct Screen {
    terminal: Terminal<CrosstermBackend<Stdout>>,
}

impl Screen {
    pub fn enter() -> io::Result<Screen> {
        static HOOK: Once = Once::new();
        HOOK.call_once(|| {
            let panicked = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore();
                panicked(info);
            }));
        });
        ACTIVE.store(true, Ordering::SeqCst);
        let entered = enable_raw_mode()
            .and_then(|()| execute!(io::stdout(), EnterAlternateScreen, Hide))
            .and_then(|()| Terminal::new(CrosstermBackend::new(io::stdout())));
        match entered {
            Ok(terminal) => Ok(Screen { terminal }),
            Err(err) => {
                restore();
                Err(err)
            }
        }
    }

    /// Draws `model` over the whole screen (at its current size: a resize
    /// is noticed here), writing only the cells that changed.
    pub fn draw(&mut self, model: &Model) -> io::Result<()> {
        self.terminal
            .draw(|frame| view::draw(frame, model))
            .map(drop)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore();
    }
}

/// Leaves raw mode and the alternate screen and shows the cursor, once,
/// each step tried even if one before failed.
fn restore() {
    if !ACTIVE.swap(false, Ordering::SeqCst) {
        return;
    }
    let _ = disable_raw_mode();
    let _ = execute!(io::stdout(), LeaveAlternateScreen, Show);
}

/// What the person at the terminal did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// `q` or Ctrl-C (which raw mode turns into a key rather than SIGINT).
    Quit,
    /// The window changed size.
    Redraw,
}

/// The inputs, as they come; the channel closes when the terminal cannot
/// be read any more. The reading thread is left blocked in its read when
/// `top` ends: the process ends with it.
pub fn inputs() -> mpsc::UnboundedReceiver<Input> {
    let (send, receive) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        loop {
            let input = match event::read() {
                Ok(Event::Key(key)) if quits(key) => Input::Quit,
                Ok(Event::Resize(..)) => Input::Redraw,
                Ok(_) => continue,
                Err(_) => return,
            };
            if send.send(input).is_err() {
                return;
            }
        }
    });
    receive
}

fn quits(key: KeyEvent) -> bool {
    if key.kind == KeyEventKind::Release {
        return false;
    }
    match key.code {
        KeyCode::Char('q' | 'Q') => !key.modifiers.contains(KeyModifiers::CONTROL),
        KeyCode::Char('c') => key.modifiers.contains(KeyModifiers::CONTROL),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q_and_ctrl_c_quit_and_nothing_else_does() {
        let key = |code, modifiers| KeyEvent::new(code, modifiers);
        assert!(quits(key(KeyCode::Char('q'), KeyModifiers::NONE)));
        assert!(quits(key(KeyCode::Char('Q'), KeyModifiers::SHIFT)));
        assert!(quits(key(KeyCode::Char('c'), KeyModifiers::CONTROL)));
        assert!(!quits(key(KeyCode::Char('c'), KeyModifiers::NONE)));
        assert!(!quits(key(KeyCode::Char('q'), KeyModifiers::CONTROL)));
        assert!(!quits(key(KeyCode::Esc, KeyModifiers::NONE)));
        let mut released = key(KeyCode::Char('q'), KeyModifiers::NONE);
        released.kind = KeyEventKind::Release;
        assert!(!quits(released));
    }
}
