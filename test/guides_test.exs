# The guides' Elixir examples, compiled as they are written: each guide's ```elixir blocks
# define test modules (and the modules they test), which ExUnit then runs with the suite.
for guide <- ["guides/testing.md"] do
  text = File.read!(guide)

  blocks = Regex.scan(~r/^```elixir\n(.*?)^```$/ms, text, capture: :all_but_first, return: :index)

  if blocks == [], do: raise("#{guide} has no Elixir examples")

  for [{at, length}] <- blocks do
    # Line numbers as in the guide, so a failure points at its example.
    line = text |> binary_part(0, at) |> String.split("\n") |> length()

    text
    |> binary_part(at, length)
    |> Code.string_to_quoted!(file: guide, line: line)
    |> Code.compile_quoted(guide)
  end
end
