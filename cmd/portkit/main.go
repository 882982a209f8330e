// Command portkit publishes ports of rootless containers and gives them a
// network: `portkit run` (RootlessKit's place), `portkit daemon` (a
// forwarder for an existing netns), and rootlessctl's verbs add-ports,
// list-ports, remove-ports and info against any RootlessKit-compatible API
// socket.
//
// Each command lives in its own file and adds itself to commands in init():
//
//	func init() {
//		commands["daemon"] = command{summary: "…", run: exitWith(daemonMain)}
//	}
//
// run gets the arguments after the command's name, including --help, which
// it answers itself. It returns nil for success, flag.ErrHelp after printing
// help (exit 0), exitCode(n) to exit with n having reported already, or any
// other error, which main prints as "error: …" and exits 1.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
)

// command is one portkit verb.
type command struct {
	summary string                    // one line for `portkit --help`
	run     func(args []string) error // args after the verb
}

// commands holds every verb, by name; files add theirs in init().
var commands = map[string]command{}

// globals are the flags given before the command: `portkit --socket S list-ports`.
// The API commands take them after their name too.
var globals struct {
	socket string
	json   bool
}

// exitCode makes main exit with that code and print nothing: the command
// has reported already (or 0: all is well).
type exitCode int

func (c exitCode) Error() string { return fmt.Sprintf("exit status %d", int(c)) }

// exitWith adapts a command written as func(args) int (it prints its own
// errors) to command.run.
func exitWith(f func(args []string) int) func(args []string) error {
	return func(args []string) error {
		if code := f(args); code != 0 {
			return exitCode(code)
		}
		return nil
	}
}

// stdout is where commands print results; tests of the output format read it.
var stdout io.Writer = os.Stdout

func main() {
	os.Exit(runMainArgs(filepath.Base(os.Args[0]), os.Args[1:]))
}

// runMainArgs dispatches on the program name, then on the first argument,
// and returns the exit code.
func runMainArgs(prog string, args []string) int {
	var name string
	switch prog {
	case "rootlesskit":
		// Installed as rootlesskit (make install-rootlesskit-compat):
		// containerd-rootless.sh passes run's flags with no verb.
		name = "run"
	default:
		var err error
		name, args, err = parseGlobals(args)
		if errors.Is(err, flag.ErrHelp) {
			printHelp(stdout)
			return 0
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "error: %v\n", err)
			return 1
		}
	}
	if name == "help" {
		if len(args) == 0 {
			printHelp(stdout)
			return 0
		}
		name, args = args[0], []string{"--help"}
	}
	cmd, ok := commands[name]
	if !ok {
		fmt.Fprintf(os.Stderr, "error: unknown command %q: run 'portkit --help' for the list\n", name)
		return 1
	}
	err := cmd.run(args)
	var code exitCode
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, &code):
		return int(code)
	}
	fmt.Fprintf(os.Stderr, "error: %v\n", err)
	return 1
}

// parseGlobals reads the flags before the command name.
func parseGlobals(args []string) (name string, rest []string, err error) {
	fs := flag.NewFlagSet("portkit", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	fs.StringVar(&globals.socket, "socket", "", "")
	fs.BoolVar(&globals.json, "json", false, "")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return "", nil, err
		}
		return "", nil, fmt.Errorf("%v: run 'portkit --help' for the global flags", err)
	}
	if fs.NArg() == 0 {
		return "", nil, errors.New("no command given: run 'portkit --help' for the list")
	}
	return fs.Arg(0), fs.Args()[1:], nil
}

func printHelp(w io.Writer) {
	fmt.Fprint(w, `Usage: portkit [--socket PATH] [--json] COMMAND [ARGS...]

portkit publishes the ports of rootless containers and gives them a network,
as RootlessKit does, and speaks RootlessKit's API (rootlessctl works with it).

Commands:
`)
	names := make([]string, 0, len(commands))
	width := 0
	for name := range commands {
		names = append(names, name)
		width = max(width, len(name))
	}
	sort.Strings(names)
	for _, name := range names {
		fmt.Fprintf(w, "  %-*s  %s\n", width, name, commands[name].summary)
	}
	fmt.Fprint(w, `
Global flags:
  --socket PATH  API socket of add-ports, list-ports, remove-ports and info
                 (default $ROOTLESSKIT_STATE_DIR/api.sock, then $PORTKIT_STATE_DIR/api.sock)
  --json         print JSON (add-ports, list-ports, info)

Run 'portkit COMMAND --help' for a command's flags.
`)
}

// parseFlags parses args with fs, flags and arguments in any order ("--"
// ends the flags). On --help it prints usage and returns flag.ErrHelp.
func parseFlags(fs *flag.FlagSet, usage string, args []string) ([]string, error) {
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	var positional []string
	for {
		err := fs.Parse(args)
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(stdout, usage)
			fs.SetOutput(stdout)
			fs.PrintDefaults()
			return nil, err
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %v: run '%s --help'", fs.Name(), err, fs.Name())
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return positional, nil
		}
		if consumed := len(args) - len(rest); consumed > 0 && args[consumed-1] == "--" {
			return append(positional, rest...), nil
		}
		positional = append(positional, rest[0])
		args = rest[1:]
	}
}

// apiSocket is the socket the API commands talk to.
func apiSocket(flagValue string) (string, error) {
	if flagValue != "" {
		return flagValue, nil
	}
	for _, env := range []string{"ROOTLESSKIT_STATE_DIR", "PORTKIT_STATE_DIR"} {
		if dir := os.Getenv(env); dir != "" {
			return filepath.Join(dir, "api.sock"), nil
		}
	}
	return "", errors.New("no API socket: pass --socket PATH, or set ROOTLESSKIT_STATE_DIR or PORTKIT_STATE_DIR to the daemon's state directory")
}
