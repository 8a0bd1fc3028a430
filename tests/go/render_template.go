// render_template renders the TEMPLATE of an Ollama Modelfile with Go's text/template, the
// engine Ollama uses, for a list of exchanges, so a test can compare the result with
// instructune's own prompt builder character for character.
//
// Usage: go run render_template.go MODELFILE < exchanges.json
// exchanges.json: [{"system": "...", "prompt": "..."}, ...]; prints a JSON list of strings.
// Standard library only, so `go run` needs nothing but Debian's golang-go.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

// exchange holds the fields a legacy (non-.Messages) Ollama template reads.
type exchange struct {
	System   string `json:"system"`
	Prompt   string `json:"prompt"`
	Response string `json:"response"`
}

// modelfileTemplate returns the text between TEMPLATE """ and the next """.
func modelfileTemplate(text string) (string, error) {
	const open = `TEMPLATE """`
	start := strings.Index(text, open)
	if start < 0 {
		return "", fmt.Errorf("no TEMPLATE \"\"\" in the Modelfile")
	}
	rest := text[start+len(open):]
	end := strings.Index(rest, `"""`)
	if end < 0 {
		return "", fmt.Errorf("the TEMPLATE is not closed")
	}
	return rest[:end], nil
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "render_template:", err)
	os.Exit(1)
}

func main() {
	if len(os.Args) != 2 {
		fail(fmt.Errorf("usage: render_template MODELFILE < exchanges.json"))
	}
	raw, err := os.ReadFile(os.Args[1])
	if err != nil {
		fail(err)
	}
	body, err := modelfileTemplate(string(raw))
	if err != nil {
		fail(err)
	}
	tmpl, err := template.New("TEMPLATE").Parse(body)
	if err != nil {
		fail(err)
	}
	var exchanges []exchange
	if err := json.NewDecoder(os.Stdin).Decode(&exchanges); err != nil {
		fail(err)
	}
	rendered := make([]string, 0, len(exchanges))
	for _, ex := range exchanges {
		var out strings.Builder
		if err := tmpl.Execute(&out, ex); err != nil {
			fail(err)
		}
		rendered = append(rendered, out.String())
	}
	if err := json.NewEncoder(os.Stdout).Encode(rendered); err != nil {
		fail(err)
	}
}
