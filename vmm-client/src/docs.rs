//! `vmm-client completions SHELL` and `vmm-client man`: a shell completion
//! script and the man page, generated from the clap definition that parses
//! the arguments (handed in by `main`), so that they list exactly the
//! subcommands and flags there are.

use clap_complete::Shell;
use roff::{Roff, bold, roman};

use crate::failure::Failure;
use crate::out;

/// The name the scripts complete and the man page is about.
const NAME: &str = "vmm-client";

/// Prints the completion script for `shell`.
pub fn completions(shell: Shell, mut command: clap::Command) -> Result<(), Failure> {
    let mut script = Vec::new();
    if shell != Shell::Bash {
        clap_complete::generate(shell, &mut command, NAME, &mut script);
        return print(script);
    }
    // clap_complete's bash script spells a name with a hyphen two ways, and
    // then completes nothing after a subcommand (clap-rs/clap#6421): so it
    // is made for a name without one, and bound to the real name.
    clap_complete::generate(shell, &mut command, BASH_NAME, &mut script);
    let script = String::from_utf8(script)
        .map_err(|err| Failure::Usage(format!("generated text is not UTF-8: {err}")))?;
    let bound = format!(" {BASH_NAME}\n");
    if !script.contains(&bound) {
        return Err(Failure::Usage(
            "the bash completion script does not end as expected".into(),
        ));
    }
    out::part(&script.replace(&bound, &format!(" {NAME}\n")));
    Ok(())
}

/// What the bash script is generated for, before it is bound to [`NAME`].
const BASH_NAME: &str = "vmm_client";

/// Prints the man page, in roff: one page, `vmm-client(1)`. clap_mangen's
/// own page would refer to a page per subcommand (`vmm-client-list(1)`),
/// which this one command cannot install; so the subcommands section is
/// written here and points at `vmm-client help SUBCOMMAND` instead, and the
/// exit codes (the help's closing text) get their usual section name.
pub fn man(command: clap::Command) -> Result<(), Failure> {
    let mut command = command.name(NAME);
    command.build();
    let page = render_man(&command)
        .map_err(|err| Failure::Usage(format!("cannot render the man page: {err}")))?;
    print(page)
}

fn render_man(command: &clap::Command) -> std::io::Result<Vec<u8>> {
    let man = clap_mangen::Man::new(command.clone());
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;

    let mut roff = Roff::new();
    roff.control("SH", ["SUBCOMMANDS"]);
    for sub in command.get_subcommands().filter(|sub| !sub.is_hide_set()) {
        roff.control("TP", []);
        roff.text([bold(format!("{NAME} {}", sub.get_name()))]);
        let about = sub.get_about().map(|about| about.to_string());
        roff.text([roman(about.unwrap_or_default())]);
    }
    roff.control("PP", []);
    roff.text([
        roman("Run "),
        bold(format!("{NAME} help SUBCOMMAND")),
        roman(" for a subcommand's arguments and details."),
    ]);
    if let Some(after) = command.get_after_help() {
        // Laid out by hand (a table of codes): not filled.
        roff.control("SH", ["EXIT STATUS"]);
        roff.control("nf", []);
        for line in after.to_string().lines() {
            roff.text([roman(line)]);
        }
        roff.control("fi", []);
    }
    roff.to_writer(&mut page)?;

    man.render_version_section(&mut page)?;
    Ok(page)
}

/// Prints generated text, through `out` so that a reader that goes away
/// early (`| head`) ends the run quietly.
fn print(text: Vec<u8>) -> Result<(), Failure> {
    let text = String::from_utf8(text)
        .map_err(|err| Failure::Usage(format!("generated text is not UTF-8: {err}")))?;
    out::part(&text);
    Ok(())
}
