# The README's and the guides' Elixir examples. Every block of a guide that defines modules
# is compiled as it is written, and the test modules among them run with the suite; the
# other blocks (fragments that need a broker or names of your own) must at least parse.
# Line numbers are the guide's, so a failure points at its example.
examples = fn path ->
  text = File.read!(path)

  for [{at, length}] <-
        Regex.scan(~r/^```elixir\n(.*?)^```$/ms, text, capture: :all_but_first, return: :index) do
    line = text |> binary_part(0, at) |> String.split("\n") |> length()
    {binary_part(text, at, length), line}
  end
end

runnable =
  for path <- ["README.md" | Path.wildcard("guides/*.md")],
      {code, line} <- examples.(path),
      quoted = Code.string_to_quoted!(code, file: path, line: line),
      String.starts_with?(path, "guides/") and String.starts_with?(code, "defmodule "),
      do: {path, quoted}

# Guides with test modules: each must keep at least one.
for guide <-
      ~w(guides/testing.md guides/producing.md guides/consuming.md guides/configuration.md),
    not List.keymember?(runnable, guide, 0),
    do: raise("#{guide} has lost its runnable examples")

for {path, quoted} <- runnable, do: Code.compile_quoted(quoted, path)
