defmodule Ottla.UtilTest do
  use ExUnit.Case, async: true

  doctest Ottla.Util

  alias Ottla.Util

  defp letters(range), do: Enum.map(range, &List.to_string([&1]))
  defp pairs(range), do: Enum.map(letters(range), &{&1, &1})

  describe "chunk_by_byte_size (Elsa's own cases)" do
    test "chunks strings to less than the given size, counting 10 bytes per message" do
      # 9 one-byte messages count 99 bytes; a 10th would reach 110.
      assert Util.chunk_by_byte_size(letters(?a..?z), 10 * 10) ==
               [letters(?a..?i), letters(?j..?r), letters(?s..?z)]
    end

    test "chunks {key, value} pairs by key and value bytes" do
      assert Util.chunk_by_byte_size(pairs(?a..?z), 20 + 10 * 10) ==
               [pairs(?a..?i), pairs(?j..?r), pairs(?s..?z)]
    end
  end

  describe "chunk_by_byte_size" do
    test "keeps every message once, in order, each chunk under the size" do
      messages = for i <- 1..500, do: {"key-#{i}", String.duplicate("v", rem(i * 37, 300))}
      chunks = Util.chunk_by_byte_size(messages, 2_000)

      assert List.flatten(chunks) == messages

      for chunk <- chunks do
        size = Enum.sum(for {k, v} <- chunk, do: byte_size(k) + byte_size(v) + 10)
        assert size < 2_000, "a chunk of #{length(chunk)} messages counts #{size} bytes"
      end
    end

    test "a message bigger than the size is a chunk of its own, with no empty chunk before it" do
      big = String.duplicate("x", 500)
      assert Util.chunk_by_byte_size([big, "a"], 100) == [[big], ["a"]]
      assert Util.chunk_by_byte_size(["a", big, "b"], 100) == [["a"], [big], ["b"]]
      assert Util.chunk_by_byte_size([], 100) == []
    end

    test "sizes the shapes Ottla.produce/4 takes: iodata, nil keys, maps with headers" do
      messages = [
        ["ab", ?c],
        {nil, "1234"},
        %{key: "k", value: ["v", "w"], headers: [{"h", "12"}]},
        %{value: nil}
      ]

      sizes = [3, 4, 1 + 2 + 1 + 2, 0]
      # Each alone fits under its size + 11; the total does not fit under the sum.
      for {message, size} <- Enum.zip(messages, sizes) do
        assert Util.chunk_by_byte_size([message, message], 2 * (size + 10) + 1) ==
                 [[message, message]]

        assert Util.chunk_by_byte_size([message, message], 2 * (size + 10)) ==
                 [[message], [message]]
      end
    end

    test "takes any enumerable and the default size of 900,000 bytes" do
      assert Util.chunk_by_byte_size(Stream.map(1..3, &"m#{&1}")) == [["m1", "m2", "m3"]]
      chunks = Util.chunk_by_byte_size(List.duplicate(String.duplicate("v", 1_000), 1_000))
      # 1,010 bytes each: 891 fit under 900,000.
      assert Enum.map(chunks, &length/1) == [891, 109]
    end

    test "bad input raises ArgumentError naming the argument" do
      for {args, named} <- [
            {[:not_enumerable, 10], "messages"},
            {[["a"], 0], "chunk_byte_size"},
            {[["a"], 1.5], "chunk_byte_size"},
            {[["a"], 10, fn -> 1 end], "byte_size_function"},
            {[["a"], 10, fn _ -> -1 end], "byte_size_function"},
            {[["a"], 10, fn _ -> :big end], "byte_size_function"},
            {[[{:k, "v"}], 10], "invalid message"},
            {[[%{key: "k", headers: :none}], 10], "invalid message"},
            {[[["a", :b]], 10], "invalid message"},
            {[[%Ottla.Message{value: "v"}], 10], "byte_size_function"}
          ] do
        error = assert_raise ArgumentError, fn -> apply(Util, :chunk_by_byte_size, args) end
        assert error.message =~ named, "#{inspect(args)}: #{error.message}"
      end
    end
  end
end
