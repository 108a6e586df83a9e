defmodule Ottla.Fetch do
  @moduledoc """
  One-off reads of a topic, with the API of Elsa's `Elsa.Fetch`: `fetch/3`, `fetch_stream/3`
  and the searches built on it. Nothing joins a group or commits.

  ## Example

      {:ok, high_watermark, messages} = Ottla.Fetch.fetch([localhost: 9092], "events", partition: 0)

      [localhost: 9092]
      |> Ottla.Fetch.search_keys("events", "customer-42")
      |> Enum.take(10)
  """

  alias Ottla.{Connection, Native, Options, Reply}

  @chunk 10_000

  @doc "Reads one partition; see `Ottla.fetch/3`."
  @spec fetch(Ottla.target(), String.t(), keyword) ::
          {:ok, non_neg_integer, [Ottla.Message.t()]} | {:error, Ottla.Error.t()}
  def fetch(target, topic, opts \\ []), do: Ottla.fetch(target, topic, opts)

  @doc """
  A lazy `Stream` of every message of `topic` (all partitions, one after the other, each in
  offset order), or of one partition. One fetch consumer reads the whole stream, in chunks,
  and the stream never holds more than a chunk,
  from `:start_offset` up to the high watermark each partition had when its reading began
  (or `:end_offset`). Raises `Ottla.Error` when a chunk cannot be read.

  ## Options

    * `:partition` - read only this partition. Defaults to all of them.
    * `:start_offset` - the first offset to read. Defaults to the log start.
    * `:end_offset` - stop before this offset. Defaults to the high watermark.
    * `:chunk_size` - messages per read. Defaults to `10000`.
    * `:timeout` - ms for each read. Defaults to `10000`.
  """
  @spec fetch_stream(Ottla.target(), String.t(), keyword) :: Enumerable.t()
  def fetch_stream(target, topic, opts \\ []) do
    opts =
      Options.keyword!(
        opts,
        [:partition, :start_offset, :end_offset, chunk_size: @chunk, timeout: 10_000],
        "Ottla.Fetch.fetch_stream/3 options"
      )

    topic = Options.topic!(topic)
    chunk = Options.integer!(opts[:chunk_size], :chunk_size, 1, 1_000_000)
    timeout = Options.timeout!(opts[:timeout], :timeout)

    start =
      opts[:start_offset] && Options.integer!(opts[:start_offset], :start_offset, 0, max_offset())

    stop = opts[:end_offset] && Options.integer!(opts[:end_offset], :end_offset, 0, max_offset())

    partitions =
      case opts[:partition] do
        nil -> fn -> 0..(partition_count!(target, topic, timeout) - 1) end
        p -> fn -> [Options.integer!(p, :partition, 0)] end
      end

    # The partition count is asked for, and the stream's one fetch consumer taken, when the
    # stream starts, not when it is built; the consumer goes back when the stream ends or halts.
    Stream.resource(
      fn ->
        clients = Connection.clients!(target)
        {Native.fetch_cursor_new(clients), Enum.to_list(partitions.())}
      end,
      fn
        {cursor, []} ->
          {:halt, {cursor, []}}

        {cursor, [p | rest]} ->
          {[partition_stream(cursor, topic, p, {start, stop, chunk, timeout})], {cursor, rest}}
      end,
      fn {cursor, _} -> Reply.await(&Native.fetch_cursor_close(&1, &2, cursor), 10_000) end
    )
    |> Stream.flat_map(& &1)
  end

  defp partition_stream(cursor, topic, partition, {start, stop, chunk, timeout}) do
    Stream.resource(
      fn ->
        # The high watermark when this partition's reading begins ends it.
        {:ok, high, _} = read!(cursor, topic, partition, :latest, nil, 1, timeout)
        {start || :earliest, min(stop || high, high)}
      end,
      fn
        {:done, _} = state ->
          {:halt, state}

        {offset, stop} ->
          case offset != :earliest and offset >= stop do
            true ->
              {:halt, {:done, stop}}

            false ->
              {:ok, _high, messages} =
                read!(cursor, topic, partition, offset, stop, chunk, timeout)

              case messages do
                [] -> {:halt, {:done, stop}}
                _ -> {messages, {List.last(messages).offset + 1, stop}}
              end
          end
      end,
      fn _ -> :ok end
    )
  end

  defp read!(cursor, topic, partition, offset, until, max, timeout) do
    from = Options.position(offset)

    case Reply.await(
           &Native.fetch_cursor_read(&1, &2, cursor, topic, partition, from, until, max, timeout),
           timeout
         ) do
      {:ok, _, _} = ok -> ok
      {:error, error} -> raise error
    end
  end

  defp partition_count!(target, topic, timeout) do
    case Ottla.Admin.partition_count(target, topic, timeout) do
      {:ok, count} -> count
      {:error, error} -> raise error
    end
  end

  @doc "The messages of `fetch_stream/3` for which `fun` returns a truthy value (a `Stream`)."
  @spec search(Ottla.target(), String.t(), (Ottla.Message.t() -> as_boolean(term)), keyword) ::
          Enumerable.t()
  def search(target, topic, fun, opts \\ [])

  def search(target, topic, fun, opts) when is_function(fun, 1) do
    # A match is copied out of its chunk's binary, so a few matches do not keep whole chunks.
    fetch_stream(target, topic, opts)
    |> Stream.filter(fun)
    |> Stream.map(&Ottla.Message.copy/1)
  end

  def search(_target, _topic, fun, _opts),
    do: raise(ArgumentError, "invalid fun #{inspect(fun)}: expected a function of 1 argument")

  @doc "The messages whose key contains `term` (a `Stream`); see `fetch_stream/3`."
  @spec search_keys(Ottla.target(), String.t(), String.t(), keyword) :: Enumerable.t()
  def search_keys(target, topic, term, opts \\ [])

  def search_keys(target, topic, term, opts) when is_binary(term),
    do: search(target, topic, &(is_binary(&1.key) and String.contains?(&1.key, term)), opts)

  def search_keys(_target, _topic, term, _opts),
    do: raise(ArgumentError, "invalid term #{inspect(term)}: expected a string")

  @doc "The messages whose value contains `term` (a `Stream`); see `fetch_stream/3`."
  @spec search_values(Ottla.target(), String.t(), String.t(), keyword) :: Enumerable.t()
  def search_values(target, topic, term, opts \\ [])

  def search_values(target, topic, term, opts) when is_binary(term),
    do: search(target, topic, &(is_binary(&1.value) and String.contains?(&1.value, term)), opts)

  def search_values(_target, _topic, term, _opts),
    do: raise(ArgumentError, "invalid term #{inspect(term)}: expected a string")

  defp max_offset, do: 9_223_372_036_854_775_807
end
