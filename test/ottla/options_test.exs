defmodule Ottla.OptionsTest do
  use ExUnit.Case, async: true

  alias Ottla.Options

  describe "bootstrap!/1" do
    test "accepts Elsa's keyword endpoints, tuples, charlists and strings" do
      assert Options.bootstrap!(localhost: 9092) == "localhost:9092"
      assert Options.bootstrap!([{"a", 1}, {~c"b", 2}]) == "a:1,b:2"
      assert Options.bootstrap!("a:1, b:2") == "a:1,b:2"
    end

    test "rejects malformed endpoints naming :endpoints" do
      for bad <- [
            "",
            "a",
            "a:b",
            "a:1:2",
            [],
            [{"a", 0}],
            [{"", 1}],
            [{nil, 1}],
            [{"a b", 1}],
            %{}
          ] do
        assert_raise ArgumentError, ~r/:endpoints/, fn -> Options.bootstrap!(bad) end
      end
    end
  end

  describe "config!/2" do
    test "stringifies keys and values" do
      assert Options.config!("a.b": 1, c: true, d: :x, e: 1.5) ==
               [{"a.b", "1"}, {"c", "true"}, {"d", "x"}, {"e", "1.5"}]

      assert Options.config!(%{"x" => "y"}) == [{"x", "y"}]
    end

    test "rejects values that are not scalars" do
      assert_raise ArgumentError, ~r/:config value for "k"/, fn ->
        Options.config!([{"k", [1]}])
      end

      assert_raise ArgumentError, ~r/:config entry/, fn -> Options.config!([1]) end
    end
  end
end
