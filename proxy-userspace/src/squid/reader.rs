//! Reading configuration text into logical lines: files, `include`, comments,
//! continuation lines; and splitting a line into tokens.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use super::{ConfigError, Diagnostic};

/// Deepest `include` nesting accepted (Squid's limit too).
const MAX_INCLUDE_DEPTH: usize = 16;

/// Where a line came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Loc {
    /// File name as shown in diagnostics.
    pub file: Arc<str>,
    /// 1-based line number.
    pub line: usize,
}

impl Loc {
    /// A diagnostic about this line.
    pub fn diag(&self, message: impl Into<String>, text: impl Into<String>) -> Diagnostic {
        Diagnostic {
            file: self.file.to_string(),
            line: self.line,
            message: message.into(),
            text: text.into(),
        }
    }
}

/// One logical line (continuations joined), neither blank nor a comment.
#[derive(Clone, Debug)]
pub(super) struct SourceLine {
    /// Where it starts.
    pub loc: Loc,
    /// The directory relative file names on this line are taken from.
    pub dir: Arc<Path>,
    /// The text, trimmed.
    pub text: String,
}

/// A token of a directive line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Token {
    /// A bare word.
    Word(String),
    /// A double-quoted string, quotes removed (in `acl` lines: a file name).
    Quoted(String),
}

impl Token {
    /// The text of the token, quotes removed.
    pub fn text(&self) -> &str {
        match self {
            Self::Word(text) | Self::Quoted(text) => text,
        }
    }
}

/// Collects the logical lines of a configuration, following includes.
#[derive(Default)]
pub(super) struct Reader {
    /// Lines in reading order.
    pub lines: Vec<SourceLine>,
    /// Warnings found while reading (globs that matched nothing).
    pub warnings: Vec<Diagnostic>,
    /// Canonical paths of the files being read, outermost first.
    stack: Vec<PathBuf>,
}

impl Reader {
    /// Reads the top-level file.
    pub fn read_top_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.display().to_string(),
            source,
        })?;
        let canonical = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        self.stack.push(canonical);
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let result = self.read_text(
            &text,
            Arc::from(path.display().to_string()),
            Arc::from(dir.as_path()),
        );
        self.stack.pop();
        result
    }

    /// Reads configuration text named `file`, whose relative names are taken from
    /// `dir`.
    pub fn read_text(
        &mut self,
        text: &str,
        file: Arc<str>,
        dir: Arc<Path>,
    ) -> Result<(), ConfigError> {
        for (line, text) in logical_lines(text) {
            let loc = Loc {
                file: file.clone(),
                line,
            };
            let mut words = text.split_whitespace();
            if words.next() == Some("include") {
                let names: Vec<&str> = words.collect();
                if names.is_empty() {
                    return Err(loc.diag("include needs a file name", text).into());
                }
                for name in names {
                    self.include(name, &loc, &dir)?;
                }
                continue;
            }
            self.lines.push(SourceLine {
                loc,
                dir: dir.clone(),
                text,
            });
        }
        Ok(())
    }

    fn include(&mut self, name: &str, loc: &Loc, dir: &Path) -> Result<(), ConfigError> {
        let name = name.trim_matches('"');
        let pattern = resolve(dir, name);
        if name.contains(['*', '?', '[']) {
            let pattern_text = pattern.to_string_lossy();
            let paths = glob::glob(&pattern_text)
                .map_err(|err| loc.diag(format!("bad include pattern: {err}"), name))?;
            let mut matched: Vec<PathBuf> = paths.filter_map(Result::ok).collect();
            matched.sort();
            if matched.is_empty() {
                self.warnings
                    .push(loc.diag("include pattern matches no file; nothing read", name));
            }
            for path in matched {
                self.include_file(&path, loc)?;
            }
            Ok(())
        } else {
            self.include_file(&pattern, loc)
        }
    }

    fn include_file(&mut self, path: &Path, loc: &Loc) -> Result<(), ConfigError> {
        let shown = path.display().to_string();
        if self.stack.len() >= MAX_INCLUDE_DEPTH {
            return Err(loc
                .diag(
                    format!("includes nested deeper than {MAX_INCLUDE_DEPTH} files"),
                    shown,
                )
                .into());
        }
        let text = fs::read_to_string(path)
            .map_err(|err| loc.diag(format!("cannot read included file: {err}"), &shown))?;
        let canonical = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        if self.stack.contains(&canonical) {
            return Err(loc
                .diag("include loop: the file is already being read", shown)
                .into());
        }
        self.stack.push(canonical);
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let result = self.read_text(&text, Arc::from(shown), Arc::from(dir.as_path()));
        self.stack.pop();
        result
    }
}

/// `name` taken relative to `dir` unless absolute.
pub(super) fn resolve(dir: &Path, name: &str) -> PathBuf {
    let path = Path::new(name);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        dir.join(path)
    }
}

/// Splits text into logical lines: `(first line number, trimmed text)`, comment
/// and blank lines dropped, lines ending in `\` joined with the next one.
pub(super) fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim_end();
        if line.trim_start().starts_with('#') {
            // A comment inside a continued line is skipped; the line goes on.
            continue;
        }
        let (content, continues) = match line.strip_suffix('\\') {
            Some(content) => (content, true),
            None => (line, false),
        };
        let (start, mut buffer) = pending.take().unwrap_or((index + 1, String::new()));
        buffer.push_str(content);
        if continues {
            pending = Some((start, buffer));
        } else {
            push_logical(&mut out, start, buffer);
        }
    }
    if let Some((start, buffer)) = pending {
        push_logical(&mut out, start, buffer);
    }
    out
}

fn push_logical(out: &mut Vec<(usize, String)>, start: usize, buffer: String) {
    let text = buffer.trim();
    if !text.is_empty() && !text.starts_with('#') {
        out.push((start, text.to_owned()));
    }
}

/// Splits a directive line into tokens. A token that starts with `#` begins a
/// comment; `"…"` is one token (`\"` and `\\` escape).
pub(super) fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        match chars.peek() {
            None | Some('#') => break,
            Some('"') => {
                chars.next();
                let mut value = String::new();
                loop {
                    match chars.next() {
                        None => return Err("unterminated quoted string".into()),
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\')) => value.push(c),
                            Some(c) => {
                                value.push('\\');
                                value.push(c);
                            }
                            None => return Err("unterminated quoted string".into()),
                        },
                        Some(c) => value.push(c),
                    }
                }
                tokens.push(Token::Quoted(value));
            }
            Some(_) => {
                let mut value = String::new();
                while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                    value.push(c);
                }
                tokens.push(Token::Word(value));
            }
        }
    }
    Ok(tokens)
}

/// The raw text after the first `words` whitespace-separated words of `text`,
/// trimmed (for directives whose last argument is the rest of the line).
pub(super) fn rest_after(text: &str, words: usize) -> &str {
    let mut rest = text.trim_start();
    for _ in 0..words {
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        rest = rest[end..].trim_start();
    }
    rest.trim_end()
}

/// Values read from an ACL value file: one per line, blank lines and `#`
/// comments skipped. As in Squid, a word starting with `#` ends the value
/// (`.example.com  # ads`). A value with whitespace inside, or starting with
/// `"`, is an error: the effective configuration writes values as words of the
/// `acl` line, where it would become several values, or a file name.
pub(super) fn read_value_file(path: &Path, loc: &Loc) -> Result<Vec<(String, Loc)>, Diagnostic> {
    let shown = path.display().to_string();
    let text = fs::read_to_string(path)
        .map_err(|err| loc.diag(format!("cannot read ACL value file: {err}"), &shown))?;
    let file: Arc<str> = Arc::from(shown);
    let mut values = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let value_loc = Loc {
            file: file.clone(),
            line: index + 1,
        };
        let value = without_trailing_comment(line.trim());
        if value.is_empty() || value.starts_with('#') {
            continue;
        }
        if value.contains(char::is_whitespace) {
            return Err(value_loc.diag(
                "an ACL value cannot contain whitespace (one value per line)",
                value,
            ));
        }
        if value.starts_with('"') {
            return Err(value_loc.diag("an ACL value cannot start with '\"'", value));
        }
        values.push((value.to_owned(), value_loc));
    }
    Ok(values)
}

/// `text` up to a word that starts with `#`, trimmed.
fn without_trailing_comment(text: &str) -> &str {
    let mut previous_is_space = false;
    for (at, c) in text.char_indices() {
        if c == '#' && previous_is_space {
            return text[..at].trim_end();
        }
        previous_is_space = c.is_whitespace();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logical_lines_join_continuations_and_drop_comments() {
        let text = "# comment\n\nacl a port 1 \\\n  2 \\\n# inside\n 3\n  # indented comment\nhttp_access allow all\r\ntrailing \\";
        assert_eq!(
            logical_lines(text),
            vec![
                (3, "acl a port 1   2  3".to_owned()),
                (8, "http_access allow all".to_owned()),
                (9, "trailing".to_owned()),
            ]
        );
    }

    #[test]
    fn tokens_quotes_and_comments() {
        let tokens = tokenize(r#"acl x dstdomain "/a b/c\"d" .x.org # comment here"#).unwrap();
        assert_eq!(
            tokens,
            vec![
                Token::Word("acl".into()),
                Token::Word("x".into()),
                Token::Word("dstdomain".into()),
                Token::Quoted("/a b/c\"d".into()),
                Token::Word(".x.org".into()),
            ]
        );
        assert_eq!(tokenize("a b#c").unwrap().len(), 2);
        assert!(tokenize(r#"acl x "open"#).is_err());
    }

    #[test]
    fn value_file_comments_and_whitespace() {
        assert_eq!(without_trailing_comment(".a.example  # ads"), ".a.example");
        assert_eq!(without_trailing_comment("a#b #c"), "a#b");
        assert_eq!(without_trailing_comment("#only"), "#only");
        let dir = std::env::temp_dir().join(format!("spliced-values-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let loc = Loc {
            file: Arc::from("squid.conf"),
            line: 7,
        };
        let good = dir.join("good");
        fs::write(&good, "# list\n.a.example\t# ads\n\n  b.example  \n").unwrap();
        let values = read_value_file(&good, &loc).unwrap();
        let values: Vec<(&str, usize)> = values
            .iter()
            .map(|(value, at)| (value.as_str(), at.line))
            .collect();
        assert_eq!(values, [(".a.example", 2), ("b.example", 4)]);
        let bad = dir.join("bad");
        fs::write(&bad, "ok\nfoo bar\n").unwrap();
        let err = read_value_file(&bad, &loc).unwrap_err();
        assert_eq!((err.line, err.text.as_str()), (2, "foo bar"));
        assert!(err.file.ends_with("bad"), "{err}");
        fs::write(&bad, "\"quoted\n").unwrap();
        let err = read_value_file(&bad, &loc).unwrap_err();
        assert_eq!((err.line, err.text.as_str()), (1, "\"quoted"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rest_of_line() {
        assert_eq!(
            rest_after("logformat  mine %ts  %>a #x  ", 2),
            "%ts  %>a #x"
        );
        assert_eq!(rest_after("a", 3), "");
    }
}
